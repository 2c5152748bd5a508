"""The closest thing to `docker compose up` without an engine: every container command of the compose CPU
profile runs as a real process on this host, with the compose environment (and the image's ENV)
translated — service names → 127.0.0.1 on free ports, volumes → temporary directories, Redis → a real
password-protected redis-server — started in dependency order, each waited on with its own compose
healthcheck command. Then the stack must work as deployed (weights flow from the learner to inference
over HTTP; the dashboard sees the run) and stop on SIGTERM within each service's stop_grace_period,
leaving no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from deploy_helpers import DEPLOY, DOCKERFILE, REPO, render_compose, serve_target, write_env_file

from services.redis_server import RedisServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SCRIPTS = {"r2vpo-healthcheck": DEPLOY / "docker" / "healthcheck.py",
           "r2vpo-prepare-model": DEPLOY / "docker" / "prepare_model.py"}  # fmt: skip
DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?")
WEIGHTS_DEADLINE_S = 420
LEARNER_METRICS = [
    "r2vpo_learner_step",
    "r2vpo_learner_policy_version",
    "r2vpo_learner_lambda",
    "r2vpo_learner_ratio_variance",
    "r2vpo_learner_tokens_per_second",
    "r2vpo_queue_length",
]
INFERENCE_METRICS = [
    "r2vpo_inference_requests_total",
    "r2vpo_inference_generated_tokens_total",
    "r2vpo_inference_generation_latency_seconds",
    "r2vpo_inference_policy_version",
]


def seconds(duration: str | None, default: float) -> float:
    """Compose durations as rendered (`1m30s`, `40s`, `15m0s`)."""
    if not duration:
        return default
    h, m, s = DURATION.fullmatch(duration).groups()
    return int(h or 0) * 3600 + int(m or 0) * 60 + float(s or 0)


def image_env() -> dict[str, str]:
    """ENV of the runtime stages of the Dockerfile (what every container starts with)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env |= dict(pair.split("=", 1) for pair in line[4:].split())
    return {k: v for k, v in env.items() if k not in ("PATH", "VIRTUAL_ENV")}


def dependency_order(services: dict[str, dict]) -> list[str]:
    order: list[str] = []

    def visit(name: str, seen: tuple[str, ...] = ()) -> None:
        assert name not in seen, f"dependency cycle: {seen + (name,)}"
        if name in order:
            return
        for dep in services[name].get("depends_on", {}):
            if dep in services:
                visit(dep, seen + (name,))
        order.append(name)

    for name in services:
        visit(name)
    return order


@dataclass
class Service:
    name: str
    command: list[str]
    env: dict[str, str]
    port: int | None = None
    process: subprocess.Popen | None = None
    log: Path | None = None
    grace_s: float = 10.0
    healthcheck: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Stack:
    services: dict[str, Service]
    order: list[str]
    redis: RedisServer
    model_dir: Path
    run: str


class Translator:
    """Compose's view (service DNS names, volume paths) → this host's (127.0.0.1 ports, temp dirs)."""

    def __init__(self, hosts: dict[str, int], paths: dict[str, Path]) -> None:
        self.hosts, self.paths = hosts, sorted(paths.items(), key=lambda kv: -len(kv[0]))

    def url(self, m: re.Match) -> str:
        host, port = m.group("host"), m.group("port")
        if host in self.hosts:
            host, port = "127.0.0.1", str(self.hosts[host])
        return f"{m.group('scheme')}://{m.group('auth') or ''}{host}:{port}"

    def value(self, value: str) -> str:
        value = re.sub(
            r"(?P<scheme>https?|rediss?)://(?P<auth>[^@/\s\"']*@)?(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d+)",
            self.url,
            value,
        )
        for target, host_path in self.paths:
            if value == target or value.startswith(target + "/"):
                return str(host_path) + value[len(target) :]
        if value == "0.0.0.0":
            return "127.0.0.1"
        return value

    def command(self, command: list[str]) -> list[str]:
        if serve_target(command):
            return [sys.executable, "-m", "services.cli", *command[1:]]
        script = SCRIPTS[command[0]]
        return [sys.executable, str(script), *[self.value(a) for a in command[1:]]]


def wait_healthy(svc: Service, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        if svc.process.poll() is not None:
            pytest.fail(f"{svc.name} exited with {svc.process.returncode}:\n{svc.log_tail()}")
        check = subprocess.run(svc.healthcheck, capture_output=True, text=True, timeout=30)
        if check.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"{svc.name} not healthy after {deadline_s:.0f} s ({check.stderr.strip()}):\n{svc.log_tail()}"
            )
        time.sleep(0.5)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group this test started (its own session), if anything of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="module")
def stack(tmp_path_factory, default_policy_dir) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("compose-up")
    values = write_env_file(root / ".env")
    config = render_compose(root / ".env", ("cpu",))
    services = config["services"]
    order = dependency_order(services)

    # Volumes and the image's writable paths; /cache holds the cached default policy (built once per
    # machine by the test session), as the compose `cache` volume does after model-init has run.
    paths = {
        t: root / t.strip("/").replace("/", "_")
        for t in ("/data", "/cache", "/models", "/tmp", "/home/r2vpo")
    }
    for p in paths.values():
        p.mkdir(parents=True)
    (paths["/cache"] / default_policy_dir.name).symlink_to(default_policy_dir)

    redis = RedisServer(root / "redis", password=values["REDIS_PASSWORD"]).start()
    hosts = {"redis": redis.port}
    for name, svc in services.items():
        if serve_target(svc.get("command")):
            hosts[name] = free_port()
            for net in (svc.get("networks") or {}).values():
                for alias in (net or {}).get("aliases", []):
                    hosts[alias] = hosts[name]
    tr = Translator(hosts, paths)
    base_env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "PYTHONPATH": str(REPO)}
    base_env |= {k: tr.value(v) for k, v in image_env().items()}

    stack = Stack({}, [], redis, default_policy_dir, values["R2VPO_RUN"])
    try:
        for name in order:
            svc = services[name]
            if svc.get("image", "").startswith("redis:"):
                continue  # ours: the real redis-server above, with the same password
            env = base_env | {k: tr.value(str(v)) for k, v in (svc.get("environment") or {}).items()}
            target = serve_target(svc["command"])
            if target:
                env[f"R2VPO_{target.upper()}_PORT"] = str(hosts[name])
            run = Service(
                name, tr.command(svc["command"]), env, port=hosts.get(name), log=root / f"{name}.log"
            )
            run.grace_s = seconds(svc.get("stop_grace_period"), 10.0)
            if svc.get("restart") == "no":  # one-shot (model-init): must finish successfully first
                done = subprocess.run(run.command, env=env, cwd=paths["/home/r2vpo"], capture_output=True,
                                      text=True, timeout=600)  # fmt: skip
                assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"
                assert Path(done.stdout.strip()).resolve() == default_policy_dir.resolve(), done.stdout
                continue
            test = svc["healthcheck"]["test"]
            assert test[0] == "CMD", f"{name}: {test}"
            # The healthcheck runs inside the container: its 127.0.0.1:<port> is the service itself.
            own_port = svc["environment"][f"R2VPO_{target.upper()}_PORT"]
            check = [a.replace(f"127.0.0.1:{own_port}/", f"127.0.0.1:{hosts[name]}/") for a in test[1:]]
            assert check != test[1:], f"{name}: the healthcheck does not probe its own port {own_port}"
            run.healthcheck = tr.command(check)
            with run.log.open("w") as log:
                run.process = subprocess.Popen(run.command, env=env, cwd=paths["/home/r2vpo"], stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            stack.services[name] = run
            stack.order.append(name)
            start_period = seconds(svc["healthcheck"].get("start_period"), 60)
            wait_healthy(run, min(start_period, 300) + 60)
        yield stack
    finally:
        for run in stack.services.values():
            if run.process is not None:
                kill_group(run.process)
        redis.stop()


def test_every_service_command_becomes_ready(stack):
    assert set(stack.services) == {"inference", "reward", "rollout", "learner", "dashboard"}
    for svc in stack.services.values():
        assert svc.process.poll() is None, f"{svc.name} died:\n{svc.log_tail()}"
        response = httpx.get(svc.url + "/readyz", timeout=10)
        assert response.status_code == 200, f"{svc.name}: {response.text}"
        assert httpx.get(svc.url + "/healthz", timeout=10).status_code == 200


def test_services_share_one_model_built_by_model_init(stack):
    models = httpx.get(stack.services["inference"].url + "/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == stack.model_dir.name


def test_learner_weights_reach_inference_over_http(stack):
    """Rollouts flow, the learner trains, publishes http://learner:8004/weights/<v>, and inference swaps."""
    inference = stack.services["inference"]
    deadline = time.monotonic() + WEIGHTS_DEADLINE_S
    version = 0
    while time.monotonic() < deadline:
        for svc in stack.services.values():
            assert svc.process.poll() is None, f"{svc.name} died:\n{svc.log_tail()}"
        version = httpx.get(inference.url + "/readyz", timeout=10).json().get("policy_version", 0)
        if version >= 1:
            break
        time.sleep(1)
    status = httpx.get(stack.services["learner"].url + "/status", timeout=10).json()
    assert version >= 1, f"inference still serves v{version}; learner: {status}\n{inference.log_tail()}"
    assert status["groups_trained"] > 0
    learner_url = stack.services["learner"].url
    weights = httpx.get(f"{learner_url}/weights/{version}", timeout=30)
    assert weights.status_code == 200 and len(weights.content) > 0


def test_dashboard_lists_the_learner_run_from_the_shared_volume(stack):
    deadline = time.monotonic() + 60
    while True:
        runs = httpx.get(stack.services["dashboard"].url + "/api/runs", timeout=10).json()["runs"]
        if any(r["name"] == stack.run for r in runs) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert any(r["name"] == stack.run for r in runs), runs


@pytest.mark.parametrize(
    "service,metrics",
    [
        ("inference", INFERENCE_METRICS),
        ("reward", ["r2vpo_reward_calls_total", "r2vpo_reward_errors_total", "r2vpo_reward_latency_seconds"]),
        ("learner", LEARNER_METRICS),
        ("rollout", ["r2vpo_rollout_groups_produced_total"]),
    ],
)
def test_prometheus_scrape_targets_export_the_dashboard_metrics(stack, service, metrics):
    response = httpx.get(stack.services[service].url + "/metrics", timeout=10, follow_redirects=True)
    assert response.status_code == 200, f"{service} /metrics: HTTP {response.status_code}"
    missing = [m for m in metrics if not re.search(rf"^(# TYPE )?{m}", response.text, re.M)]
    assert not missing, f"{service} does not export {missing}"


def test_sigterm_stops_every_service_within_its_grace_period(stack):
    """Stopped as `docker compose down` does: dependents first, SIGTERM, at most stop_grace_period each.

    uvicorn shuts down gracefully on SIGTERM and then re-raises the signal, so a clean stop exits with
    0 or -SIGTERM (Docker reports 143); the learner's own proof of a graceful stop is its final commit.
    """
    run_dir = Path(stack.services["learner"].env["R2VPO_LEARNER_RUN_DIR"])
    assert not (run_dir / "learner_summary.json").exists()
    for name in reversed(stack.order):
        svc = stack.services[name]
        assert svc.process.poll() is None, f"{name} died before the stop:\n{svc.log_tail()}"
        started = time.monotonic()
        svc.process.send_signal(signal.SIGTERM)
        try:
            code = svc.process.wait(timeout=svc.grace_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still running {svc.grace_s:.0f} s after SIGTERM:\n{svc.log_tail()}")
        took = time.monotonic() - started
        assert code in (0, -signal.SIGTERM), (
            f"{name} exited with {code} after {took:.1f} s:\n{svc.log_tail()}"
        )
        time.sleep(0.2)
        assert not group_alive(svc.process.pid), f"{name} left processes behind"
    summary = json.loads((run_dir / "learner_summary.json").read_text())
    assert summary["steps"] >= 1 and summary["version"] >= 1, summary
