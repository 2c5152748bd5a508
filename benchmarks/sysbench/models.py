"""The policies the benchmark runs: the tiny default one, and a large randomly initialised one per device."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import log

# Model shapes built locally, randomly initialised (no downloads), with the tiny character tokenizer.
LARGE_MODELS: dict[str, dict[str, Any]] = {
    # ~99M parameters: GPT-2-small-like width and depth, Llama blocks.
    "llama-100m": {"arch": "llama", "hidden": 768, "layers": 12, "heads": 12, "kv_heads": 12,
                   "intermediate": 2560, "vocab": None, "max_positions": 512},
    # Qwen2-0.5B's shape (its real vocabulary size; the tokenizer only ever produces the first 99 ids).
    "qwen2-0.5b-shape": {"arch": "qwen2", "hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2,
                         "intermediate": 4864, "vocab": 151936, "max_positions": 2048},
}  # fmt: skip


def build_large_model(name: str, directory: Path) -> dict[str, Any]:
    """Build a randomly initialised model of shape `name` (fp32) with the tiny tokenizer; save it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from trainer.policy import Policy
    from trainer.tiny import BOS_ID, EOS_ID, PAD_ID, build_tokenizer

    shape = LARGE_MODELS[name]
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = shape["max_positions"]
    common = {
        "vocab_size": shape["vocab"] or len(tokenizer),
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "max_position_embeddings": shape["max_positions"],
        "tie_word_embeddings": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if shape["arch"] == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    )
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config_cls(**common)).to(torch.float32)
    for key, value in (("bos_token_id", BOS_ID), ("eos_token_id", EOS_ID), ("pad_token_id", PAD_ID)):
        setattr(model.generation_config, key, value)
    Policy(model, tokenizer).save(directory)
    params = sum(p.numel() for p in model.parameters())
    info = {"name": name, "shape": shape, "parameters": params, "build_s": time.perf_counter() - started}
    (directory / "r2vpo_bench_model.json").write_text(json.dumps(info, indent=1))
    return info


class Models:
    """The tiny default policy (cached) and, built on first use, the large random model of the device."""

    def __init__(self, scratch: Path, device: str, tiny: Path | None) -> None:
        self.scratch, self.device = scratch, device
        self.large_name = "qwen2-0.5b-shape" if device == "cuda" else "llama-100m"
        self._tiny = tiny
        self._large: Path | None = None
        self.info: dict[str, Any] = {}

    def tiny(self) -> Path:
        if self._tiny is None:
            from trainer.tiny import ensure_default_policy

            self._tiny = ensure_default_policy(progress=False)
        return self._tiny

    def get(self, which: str) -> Path:
        if which == "tiny":
            return self.tiny()
        if self._large is None:
            directory = self.scratch / self.large_name
            log(f"building the randomly initialised {self.large_name} model in {directory}")
            self.info[self.large_name] = build_large_model(self.large_name, directory)
            self._large = directory
        return self._large

    def label(self, which: str) -> str:
        return "tiny" if which == "tiny" else self.large_name
