"""engine: tokens/s of TorchEngine (and VllmEngine, in its own venv) vs transformers `generate`."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import ENTRY_SCRIPT, REPO, log
from .context import Context
from .machine import loadavg
from .measure import figure, median, rotated, sync_device

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"

# Batch shapes of the engine comparison: (prompts, n, max_new_tokens). The tiny one is what a rollout
# worker asks for (16 prompts × G 8 × 8 tokens); the large ones are sized to the device.
ENGINE_SHAPES = {
    ("cpu", "tiny"): (16, 8, 8),
    ("cpu", "large"): (8, 2, 16),
    ("cuda", "tiny"): (16, 8, 8),
    ("cuda", "large"): (64, 8, 64),
}


def engine_prompts(model_dir: Path, prompts: int) -> list[list[int]]:
    """`prompts` train problems of the default task as token ids (bos first), as the rollout worker sends."""
    from transformers import AutoTokenizer

    from trainer.task import Task

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    problems = Task().sample_train(prompts, random.Random(0))
    bos = tokenizer.bos_token_id
    return [[bos, *tokenizer(p.prompt, add_special_tokens=False)["input_ids"]] for p in problems]


def hf_generate(
    model: Any, rows: list[list[int]], *, max_new_tokens: int, pad_id: int, eos_id: int, seed: int
) -> int:
    """transformers `generate` (KV cache, multinomial sampling at temperature 1, no top-k / top-p) on the
    left-padded rows, plus the sampled tokens' log-probs; returns the tokens generated (to eos, incl.)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attn[i, width - len(r) :] = 1
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attn.to(device), do_sample=True,
            temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, min_new_tokens=0,
            pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True,
            return_dict_in_generate=True, output_scores=True,
        )  # fmt: skip
        new = out.sequences[:, width:]
        scores = torch.stack(out.scores, dim=1).float()  # [B, T, V], the distribution sampled from
        logp = torch.log_softmax(scores, -1).gather(-1, new[..., None]).squeeze(-1)
        del logp
        is_eos = new == eos_id
        after = is_eos.cumsum(-1) - is_eos.long()  # eos tokens before this position
        return int((after == 0).sum())


def bench_engine(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {"figures": [], "details": {}, "runs": {}}
    for which in ctx.sizes["engine_models"]:
        reps = ctx.sizes["engine_reps"] if which == "tiny" else ctx.sizes["engine_large_reps"]
        if reps <= 0:
            continue
        label = ctx.models.label(which)
        model_dir = ctx.models.get(which)
        prompts, n, max_tokens = ENGINE_SHAPES[(ctx.device, which)]
        log(
            f"engine: {label}, {prompts} prompts × n {n} × {max_tokens} tokens, {reps} reps, load {loadavg()}"
        )
        got = asyncio.run(_engine_reps(ctx, model_dir, label, prompts, n, max_tokens, reps))
        out["figures"].append(got["figure"])
        out["details"][label] = got["details"]
        out["runs"][label] = got["runs"]
        log(f"  torch engine / generate: {got['figure']['ratio']:.2f}")
    if (ctx.sizes["vllm"] or ctx.args.with_vllm) and not ctx.args.no_vllm:
        vllm = run_vllm_part(ctx)
        out["details"]["vllm"] = vllm.get("details")
        out["figures"] += vllm.get("figures", [])
    return out


async def _engine_reps(
    ctx: Context, model_dir: Path, label: str, prompts: int, n: int, max_tokens: int, reps: int
) -> dict[str, Any]:
    from services.inference.torch_engine import TorchEngine

    rows_prompt = engine_prompts(model_dir, prompts)
    engine = TorchEngine(model_dir, device=ctx.device, max_batch_size=4096)
    model = engine.policy.model  # the very same model object for both
    pad, eos = engine.policy.pad_id, engine.policy.eos_id
    rows = [p for p in rows_prompt for _ in range(n)]
    runs: dict[str, list[float]] = {"torch_engine": [], "generate": []}
    tokens: dict[str, list[int]] = {"torch_engine": [], "generate": []}
    try:
        for rep in range(reps + 1):  # rep 0 warms up
            for kind in rotated(("torch_engine", "generate"), rep):
                sync_device(ctx.device)
                started = time.perf_counter()
                if kind == "torch_engine":
                    gens = await engine.generate(
                        rows_prompt, n=n, max_tokens=max_tokens, temperature=1.0, seed=rep
                    )
                    count = sum(len(g.token_ids) for per in gens for g in per)
                else:
                    count = await asyncio.to_thread(
                        hf_generate, model, rows, max_new_tokens=max_tokens, pad_id=pad, eos_id=eos, seed=rep
                    )
                sync_device(ctx.device)
                seconds = time.perf_counter() - started
                if rep:
                    runs[kind].append(count / seconds)
                    tokens[kind].append(count)
    finally:
        engine.close()
    fig = figure(
        "engine", f"torch_engine_vs_generate_{label}", runs["torch_engine"], runs["generate"],
        unit="tokens/s",
        what=f"TorchEngine.generate, {label}, {prompts} prompts × n {n}, ≤ {max_tokens} new tokens, T=1",
        baseline_what="transformers generate (KV cache, sampling; same model object, batch, max_new_tokens)",
    )  # fmt: skip
    details = {
        "model": label,
        "batch_rows": len(rows),
        "max_new_tokens": max_tokens,
        "tokens_per_call": {k: median(v) for k, v in tokens.items()},
        "loadavg": loadavg(),
    }
    return {"figure": fig, "details": details, "runs": runs}


def run_vllm_part(ctx: Context) -> dict[str, Any]:
    """The vLLM engine against generate, in the vLLM venv (CPU) or this interpreter (GPU, if it has vLLM)."""
    python = None
    if ctx.device == "cpu" and VLLM_PYTHON.exists():
        python = str(VLLM_PYTHON)
    elif ctx.device == "cuda":
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            python = sys.executable
    if python is None:
        log("engine: no vLLM environment (.venv-vllm) here; the vLLM figure is skipped")
        return {"details": {"skipped": "no vLLM environment"}}
    which = "tiny" if ctx.device == "cpu" else "large"  # on a GPU, the model vLLM is meant for
    label = ctx.models.label(which)
    prompts, n, max_tokens = ENGINE_SHAPES[(ctx.device, which)]
    if ctx.device == "cuda":  # hand the cached GPU memory back before vLLM sizes its KV cache
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
    spec = {
        "model": str(ctx.models.get(which)), "label": label, "device": ctx.device, "prompts": prompts, "n": n,
        "max_tokens": max_tokens, "reps": ctx.sizes["engine_reps"], "out": str(ctx.scratch / "vllm.json"),
        "scratch": str(ctx.scratch / "vllm-scratch"),
    }  # fmt: skip
    spec_path = ctx.scratch / "vllm-spec.json"
    spec_path.write_text(json.dumps(spec))
    log(f"engine: vLLM engine vs generate in {python} ({label}), load {loadavg()}")
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}
    try:
        done = subprocess.run(
            [python, str(ENTRY_SCRIPT), "--vllm-worker", str(spec_path)],
            cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"details": {"error": "the vLLM part timed out after 600 s"}}
    if done.returncode != 0 or not Path(spec["out"]).exists():
        tail = (done.stdout + done.stderr)[-3000:]
        log(f"engine: the vLLM part failed (exit {done.returncode}):\n{tail}")
        return {"details": {"error": f"exit {done.returncode}", "output_tail": tail}}
    result = json.loads(Path(spec["out"]).read_text())
    fig = figure(
        "engine", f"vllm_engine_vs_generate_{label}", result["vllm_engine"], result["generate"],
        unit="tokens/s",
        what=f"VllmEngine.generate (vLLM {result.get('vllm')}, in-process, fp32, eager), {label}, "
        f"{prompts} prompts × n {n}, ≤ {max_tokens} new tokens, T=1",
        baseline_what="transformers generate in the same process (vLLM venv), same batch",
    )  # fmt: skip
    log(f"  vLLM engine / generate: {fig['ratio']:.2f}")
    return {"figures": [fig], "details": result}


def vllm_worker(spec_path: Path) -> int:
    """Runs inside the vLLM venv: VllmEngine vs generate on one model and batch, interleaved."""
    spec = json.loads(spec_path.read_text())
    scratch = Path(spec["scratch"])
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(scratch / "cache"))
    tempfile.tempdir = str(scratch)
    import torch
    import vllm
    from transformers import AutoModelForCausalLM

    from services.inference.vllm_engine import VllmEngine

    if spec["device"] == "cpu":
        torch.set_num_threads(1)  # as in the main process (vLLM in-process freezes the count after this)
    model_dir = Path(spec["model"])
    rows_prompt = engine_prompts(model_dir, spec["prompts"])
    n, max_tokens = spec["n"], spec["max_tokens"]
    engine = VllmEngine(
        model_dir, device=spec["device"], max_batch_size=1024, seed=0, gpu_memory_utilization=0.5
    )  # on a GPU, half of it: this process also holds the transformers copy of the model
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    model = model.to(spec["device"]).eval()
    rows = [p for p in rows_prompt for _ in range(n)]
    eos, pad = engine.eos_id, engine.tokenizer.pad_token_id
    runs: dict[str, list[float]] = {"vllm_engine": [], "generate": []}
    tokens: dict[str, list[int]] = {"vllm_engine": [], "generate": []}

    async def main() -> None:
        for rep in range(spec["reps"] + 1):
            for kind in rotated(("vllm_engine", "generate"), rep):
                sync_device(spec["device"])
                started = time.perf_counter()
                if kind == "vllm_engine":
                    gens = await engine.generate(
                        rows_prompt, n=n, max_tokens=max_tokens, temperature=1.0, seed=rep
                    )
                    count = sum(len(g.token_ids) for per in gens for g in per)
                else:
                    count = hf_generate(
                        model, rows, max_new_tokens=max_tokens, pad_id=pad, eos_id=eos, seed=rep
                    )
                sync_device(spec["device"])
                if rep:
                    runs[kind].append(count / (time.perf_counter() - started))
                    tokens[kind].append(count)

    try:
        asyncio.run(main())
    finally:
        engine.close()
    out = runs | {
        "tokens_per_call": {k: median(v) for k, v in tokens.items()},
        "vllm": vllm.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg": loadavg(),
    }
    Path(spec["out"]).write_text(json.dumps(out))
    return 0
