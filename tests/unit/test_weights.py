"""The weight store and fetch/verify: round trips over file:// and HTTP, and every way weights go bad."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import torch
from fastapi import FastAPI

from client.schemas import WeightsAnnouncement
from services.weights import (
    WeightStore,
    WeightsVerificationError,
    fetch_weights,
    fetch_weights_async,
    verify_and_load,
    weights_router,
)

pytestmark = pytest.mark.timeout(60)


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small state dict with a tied weight (embedding shared with the output head) and an int buffer."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(11, 4, generator=g)
    return {
        "embed.weight": emb,
        "head.weight": emb,  # tied: same storage
        "block.w": torch.randn(4, 4, generator=g).t(),  # non-contiguous
        "block.b": torch.randn(8, generator=g)[2:6],  # a view into a larger storage
        "steps": torch.tensor([3], dtype=torch.int64),
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_publish_fetch_verify_round_trip_gives_equal_tensors(tmp_path):
    store = WeightStore(tmp_path / "w")
    state = tiny_state()
    a = store.publish(3, state)
    assert a.version == 3 and a.uri == store.path_for(3).as_uri() and a.uri.startswith("file://")
    assert a.bytes == store.path_for(3).stat().st_size
    data = fetch_weights(a)
    assert hashlib.sha256(data).hexdigest() == a.sha256
    assert_same(verify_and_load(data, a, expected=state), state)


def test_bad_sha256_is_rejected_naming_both_digests(tmp_path):
    a = WeightStore(tmp_path).publish(1, tiny_state())
    wrong = a.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(WeightsVerificationError) as info:
        verify_and_load(fetch_weights(wrong), wrong)
    assert a.sha256 in str(info.value) and "0" * 64 in str(info.value)


def test_nan_tensor_is_rejected_naming_the_tensor(tmp_path):
    state = tiny_state()
    state["block.b"] = torch.tensor([0.0, float("nan"), 1.0, 2.0])
    a = WeightStore(tmp_path).publish(2, state)
    with pytest.raises(WeightsVerificationError, match="block.b"):
        verify_and_load(fetch_weights(a), a)
    state["block.b"] = torch.tensor([0.0, float("inf"), 1.0, 2.0])
    b = WeightStore(tmp_path).publish(3, state)
    with pytest.raises(WeightsVerificationError, match="non-finite"):
        verify_and_load(fetch_weights(b), b)


def test_truncated_file_is_rejected(tmp_path):
    store = WeightStore(tmp_path)
    a = store.publish(1, tiny_state())
    path = store.path_for(1)
    path.write_bytes(path.read_bytes()[: a.bytes // 2])  # a partial write
    with pytest.raises(WeightsVerificationError, match="bytes"):
        fetch_weights(a)
    partial = path.read_bytes()
    honest = a.model_copy(update={"sha256": hashlib.sha256(partial).hexdigest(), "bytes": len(partial)})
    with pytest.raises(WeightsVerificationError, match="safetensors"):
        verify_and_load(partial, honest)  # even when the announcement describes the partial bytes


def test_shape_dtype_or_key_mismatch_against_the_model_is_rejected(tmp_path):
    state = tiny_state()
    a = WeightStore(tmp_path).publish(1, state)
    data = fetch_weights(a)
    with pytest.raises(WeightsVerificationError, match="embed.weight"):
        verify_and_load(data, a, expected=state | {"embed.weight": torch.zeros(12, 4)})
    with pytest.raises(WeightsVerificationError, match="steps"):
        verify_and_load(data, a, expected=state | {"steps": torch.tensor([3], dtype=torch.int32)})
    with pytest.raises(WeightsVerificationError, match="extra.bias"):
        verify_and_load(data, a, expected=state | {"extra.bias": torch.zeros(2)})


def test_missing_file_and_unknown_scheme_are_rejected(tmp_path):
    store = WeightStore(tmp_path)
    a = store.publish(1, tiny_state())
    store.path_for(1).unlink()
    with pytest.raises(WeightsVerificationError, match="no file"):
        fetch_weights(a)
    with pytest.raises(WeightsVerificationError, match="scheme"):
        fetch_weights(a.model_copy(update={"uri": "s3://bucket/v1"}))
    with pytest.raises(WeightsVerificationError, match="limit"):
        fetch_weights(a, max_bytes=10)


def test_temp_files_are_never_listed_or_announced_and_prune_keeps_newest(tmp_path):
    store = WeightStore(tmp_path)
    for v in (1, 2, 3):
        store.publish(v, tiny_state(v))
    crashed = tmp_path / ".v00000004.safetensors.abc.tmp"  # a writer that died mid-write
    crashed.write_bytes(b"partial")
    assert store.versions() == [1, 2, 3]
    assert store.prune(keep=2) == [1]
    assert store.versions() == [2, 3]
    WeightStore(tmp_path)  # a restarted learner clears crash leftovers
    assert not crashed.exists() and store.versions() == [2, 3]


def test_weights_are_served_and_fetched_over_http(tmp_path, app_server):
    store = WeightStore(tmp_path)
    app = FastAPI()
    app.include_router(weights_router(store))
    state = tiny_state()
    with app_server(app) as base:
        store.base_url = base
        a = store.publish(7, state)
        assert a.uri == f"{base}/weights/7"
        assert_same(verify_and_load(fetch_weights(a), a, expected=state), state)
        assert_same(verify_and_load(asyncio.run(fetch_weights_async(a)), a), state)
        missing = WeightsAnnouncement(version=8, uri=f"{base}/weights/8", sha256=a.sha256, bytes=a.bytes)
        with pytest.raises(WeightsVerificationError, match="404"):
            fetch_weights(missing)
        with pytest.raises(WeightsVerificationError, match="404"):
            asyncio.run(fetch_weights_async(missing))
        short = a.model_copy(update={"bytes": a.bytes - 1})
        with pytest.raises(WeightsVerificationError, match="bytes"):
            fetch_weights(short)


def test_failed_write_announces_nothing_and_leaves_no_file(tmp_path, monkeypatch):
    store = WeightStore(tmp_path)
    store.publish(1, tiny_state())

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("services.weights.os.fsync", disk_full)
    with pytest.raises(OSError, match="space"):
        store.publish(2, tiny_state())
    assert store.versions() == [1] and not store.path_for(2).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [store.path_for(1).name]


def test_tied_weights_are_published_without_error_and_stay_equal(tmp_path):
    state = tiny_state()
    assert state["embed.weight"].data_ptr() == state["head.weight"].data_ptr()
    a = WeightStore(tmp_path).publish(1, state)
    loaded = verify_and_load(fetch_weights(a), a)
    assert torch.equal(loaded["embed.weight"], loaded["head.weight"])
