"""A weight publication interrupted half-way never gets loaded: the inference service (a real process that
follows announcements on a real Redis) keeps serving the previous version."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
import torch
from harness import REPO, assert_no_process_left, descendants, get_json, serve_command, wait_for

from client.schemas import WeightsAnnouncement
from services.queue import TrajectoryQueue, connect_redis
from services.redis_server import free_port
from services.weights import WeightStore
from trainer.policy import Policy
from trainer.tiny import build_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def announce(redis_url: str, a: WeightsAnnouncement) -> None:
    async def body() -> None:
        redis = await connect_redis(redis_url, attempts=5, backoff_s=0.05)
        try:
            await TrajectoryQueue(redis, "default", consumer="test").announce(a)
        finally:
            await redis.aclose()

    asyncio.run(body())


def perturbed(model_dir, seed: int) -> dict[str, torch.Tensor]:
    policy = Policy.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return policy.model.state_dict()


CRASH_MID_PUBLISH = """
import os, sys, time
from safetensors.torch import load_file
from services.weights import WeightStore
root, source, marker = sys.argv[1:]
def crash_point(fd):  # the bytes are in the temp file, the rename has not happened
    open(marker, "w").close()
    time.sleep(120)
os.fsync = crash_point
WeightStore(root).publish(2, load_file(source))
"""


def test_interrupted_weight_publication_is_never_loaded_and_old_version_serves(tmp_path, redis_url):
    model_dir = tmp_path / "tiny"
    Policy(*build_tiny_model()).save(model_dir)
    store = WeightStore(tmp_path / "weights")
    port = free_port()
    config = tmp_path / "inference.json"
    config.write_text(json.dumps({"model": str(model_dir), "redis_url": redis_url, "watch_weights": True,
                                  "weights_poll_s": 0.2, "admin_token": "t", "torch_threads": 1,
                                  "port": port}))  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    before = descendants()
    log = (tmp_path / "inference.log").open("wb")
    server = subprocess.Popen(
        serve_command("inference", config), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 120, "inference ready")

        def served() -> int:
            return get_json(f"{url}/v1/models")["data"][0]["policy_version"]

        announce(redis_url, store.publish(1, perturbed(model_dir, seed=1)))
        wait_for(lambda: served() == 1, 30, "v1 served")

        # 1. The publisher dies (SIGKILL) half-way through writing v2: a temp file, never renamed/announced.
        source = tmp_path / "v2-source.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.clone().contiguous() for k, v in perturbed(model_dir, seed=2).items()}, source)
        marker = tmp_path / "writing"
        publisher = subprocess.Popen(
            [sys.executable, "-c", CRASH_MID_PUBLISH, str(store.root), str(source), str(marker)], cwd=REPO
        )
        wait_for(marker.exists, 60, "the publisher to be mid-write")
        os.kill(publisher.pid, signal.SIGKILL)
        publisher.wait()
        assert list(store.root.glob("*.tmp")), "the crash should leave a temp file"
        assert store.versions() == [1] and not store.path_for(2).exists()
        WeightStore(store.root)  # a restarting learner's store clears what a crash left
        assert not list(store.root.glob("*.tmp"))

        # 2. A partial file is announced (a non-atomic copy cut short): rejected, v1 keeps serving.
        full = store.publish(3, perturbed(model_dir, seed=3))
        data = store.path_for(3).read_bytes()
        store.path_for(3).write_bytes(data[: len(data) // 2])
        announce(redis_url, full)
        rejections = 'r2vpo_inference_weight_rejections_total{reason="verification"} 1.0'
        wait_for(lambda: rejections in httpx.get(f"{url}/metrics").text, 30, "the rejection")
        assert served() == 1
        body = httpx.post(
            f"{url}/v1/completions", json={"prompt": "1+2=", "max_tokens": 4, "n": 2}, timeout=30
        )
        assert {c["policy_version"] for c in body.json()["choices"]} == {1}

        # 3. The next complete publication is loaded as usual.
        announce(redis_url, store.publish(4, perturbed(model_dir, seed=4)))
        wait_for(lambda: served() == 4, 30, "v4 served")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        assert_no_process_left(before)
