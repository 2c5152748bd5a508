"""Weight store (learner side) and fetch + verify (inference side), DESIGN §3 and §6.

The learner publishes each version as one safetensors file, written to a temp file, fsynced and renamed
(atomic: a crash mid-write leaves only a `.tmp` that is never listed or announced), and announces
`{version, uri, sha256, bytes}`. An inference server fetches the bytes (file:// or http(s)://), and
`verify_and_load` checks size, sha256, parses, checks every tensor is finite and, given the live model's
state dict, that keys, shapes and dtypes match; any failure raises `WeightsVerificationError` and the old
weights keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import httpx
import safetensors.torch
import torch
from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from client.schemas import WeightsAnnouncement

DEFAULT_MAX_BYTES = 64 * 2**30
_NAME = re.compile(r"^v(\d{8,})\.safetensors$")


class WeightsVerificationError(ValueError):
    """Fetched weights do not match their announcement or the model (the old version keeps serving)."""


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    return (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())


def _to_serialisable(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, each owning its storage (tied/shared weights are cloned, since
    safetensors refuses tensors that share memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        key = _storage_key(t)
        if key in seen or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()
        seen.add(_storage_key(t))
        out[name] = t
    return out


class WeightStore:
    """Versioned safetensors files under `root`; uris are `file://…` or `{base_url}/weights/{version}`."""

    def __init__(self, root: Path, *, base_url: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.base_url = base_url.rstrip("/") if base_url else None
        for stale in self.root.glob("*.tmp"):  # left by a crash mid-write; never announced
            stale.unlink(missing_ok=True)

    def path_for(self, version: int) -> Path:
        return self.root / f"v{version:08d}.safetensors"

    def uri_for(self, version: int) -> str:
        return f"{self.base_url}/weights/{version}" if self.base_url else self.path_for(version).as_uri()

    def versions(self) -> list[int]:
        """Published versions, ascending (temp files are never listed)."""
        found = (_NAME.match(p.name) for p in self.root.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def publish(self, version: int, state_dict: dict[str, torch.Tensor]) -> WeightsAnnouncement:
        """Serialise, write atomically (temp file, fsync, rename, fsync dir) and describe the new version."""
        data = safetensors.torch.save(_to_serialisable(state_dict), metadata={"version": str(version)})
        final = self.path_for(version)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{final.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with contextlib.suppress(OSError):  # directory fsync is not supported everywhere
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        digest = hashlib.sha256(data).hexdigest()
        return WeightsAnnouncement(version=version, uri=self.uri_for(version), sha256=digest, bytes=len(data))

    def prune(self, keep: int) -> list[int]:
        """Delete all but the newest `keep` versions; returns the versions deleted."""
        versions = self.versions()
        doomed = versions[: max(len(versions) - keep, 0)]
        for v in doomed:
            self.path_for(v).unlink(missing_ok=True)
        return doomed


def _check_size(a: WeightsAnnouncement, max_bytes: int) -> None:
    if a.bytes > max_bytes:
        raise WeightsVerificationError(
            f"weights v{a.version} announce {a.bytes} bytes, over the {max_bytes} limit"
        )


def _check_length(a: WeightsAnnouncement, got: int) -> None:
    if got != a.bytes:
        raise WeightsVerificationError(
            f"weights v{a.version} at {a.uri}: got {got} bytes, announced {a.bytes}"
        )


def _read_file(a: WeightsAnnouncement) -> bytes:
    path = Path(url2pathname(urlparse(a.uri).path))
    try:
        with path.open("rb") as f:
            data = f.read(a.bytes + 1)
    except FileNotFoundError as exc:
        raise WeightsVerificationError(f"weights v{a.version}: no file at {path}") from exc
    _check_length(a, len(data))
    return data


def _http_error(a: WeightsAnnouncement, response: httpx.Response) -> WeightsVerificationError:
    return WeightsVerificationError(f"weights v{a.version}: GET {a.uri} answered HTTP {response.status_code}")


def fetch_weights(
    a: WeightsAnnouncement, *, timeout: float = 30.0, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """The announced bytes from `a.uri` (file:// or http(s)://); their length must equal `a.bytes`."""
    _check_size(a, max_bytes)
    scheme = urlparse(a.uri).scheme
    if scheme == "file":
        return _read_file(a)
    if scheme not in ("http", "https"):
        raise WeightsVerificationError(f"weights v{a.version}: unsupported uri scheme {scheme!r}")
    chunks, size = [], 0
    with httpx.stream("GET", a.uri, timeout=timeout) as response:
        if response.status_code != 200:
            raise _http_error(a, response)
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > a.bytes:
                break
    _check_length(a, size)
    return b"".join(chunks)


async def fetch_weights_async(
    a: WeightsAnnouncement,
    *,
    timeout: float = 30.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    client: httpx.AsyncClient | None = None,
) -> bytes:
    """`fetch_weights` for an event loop: httpx.AsyncClient for http(s), a worker thread for files."""
    _check_size(a, max_bytes)
    if urlparse(a.uri).scheme not in ("http", "https"):
        return await asyncio.to_thread(fetch_weights, a, timeout=timeout, max_bytes=max_bytes)
    chunks, size = [], 0
    async with contextlib.AsyncExitStack() as stack:
        http = client or await stack.enter_async_context(httpx.AsyncClient(timeout=timeout))
        response = await stack.enter_async_context(http.stream("GET", a.uri, timeout=timeout))
        if response.status_code != 200:
            raise _http_error(a, response)
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > a.bytes:
                break
    _check_length(a, size)
    return b"".join(chunks)


def verify_and_load(
    data: bytes, a: WeightsAnnouncement, *, expected: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Check `data` against its announcement (and the live model's state dict, if given); the tensors."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != a.sha256:
        raise WeightsVerificationError(f"weights v{a.version}: sha256 {digest} != announced {a.sha256}")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise WeightsVerificationError(f"weights v{a.version}: not a valid safetensors file: {exc}") from exc
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise WeightsVerificationError(f"weights v{a.version}: tensor {name!r} has non-finite values")
    if expected is not None:
        missing, unexpected = (
            sorted(expected.keys() - tensors.keys()),
            sorted(tensors.keys() - expected.keys()),
        )
        if missing or unexpected:
            raise WeightsVerificationError(
                f"weights v{a.version}: keys differ from the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for name, ref in expected.items():
            got = tensors[name]
            if got.shape != ref.shape or got.dtype != ref.dtype:
                raise WeightsVerificationError(
                    f"weights v{a.version}: tensor {name!r} is {got.dtype} {tuple(got.shape)}, "
                    f"the model has {ref.dtype} {tuple(ref.shape)}"
                )
    return tensors


def weights_router(store: WeightStore) -> APIRouter:
    """`GET /weights/{version}`: the learner serves its published files over HTTP (404 if missing)."""
    router = APIRouter()

    @router.get("/weights/{version}")
    def get_weights(version: int) -> FileResponse:
        path = store.path_for(version)
        if version < 0 or not path.is_file():
            raise HTTPException(status_code=404, detail=f"no weights version {version}")
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    return router
