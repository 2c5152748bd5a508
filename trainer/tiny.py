"""The embedded default policy: a tiny character-level Llama, built and warm-started locally, cached.

No hub downloads: the tokenizer is a `tokenizers` WordLevel model over single characters (`<pad> <s>
</s> <unk>` + printable ASCII = 99 tokens) and the model is a randomly initialised `LlamaForCausalLM`
(~0.67M parameters) trained briefly with supervision on the task's train problems. Measured facts:
`/work/shared/notes/tiny-policy-rl.md` (200 steps ≈ 30% greedy held-out accuracy, 400 ≈ 69%).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from trainer.policy import Policy, greedy_accuracy
from trainer.task import Task, TaskConfig

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
CACHE_FORMAT = 1  # bump when the cached artefact changes meaning, so old caches are not reused


class TinyModelConfig(BaseModel):
    """Shape of the tiny Llama (vocab size comes from the tokenizer)."""

    model_config = ConfigDict(extra="forbid")

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    max_positions: int = 64
    tie_embeddings: bool = True
    seed: int = 0


class WarmStartConfig(BaseModel):
    """Supervised warm start: AdamW, linear warm-up then constant lr, loss on completion tokens only."""

    model_config = ConfigDict(extra="forbid")

    steps: int = 200
    batch_size: int = 128
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.98)
    warmup: int = 20
    grad_clip: float = 1.0
    seed: int = 0


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: every character is one token; it adds no special tokens itself."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one split per char
    tok.decoder = decoders.Fuse()  # join characters back without separators
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_model(cfg: TinyModelConfig | None = None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A freshly initialised float32 tiny Llama (seeded, global RNG untouched) and its tokenizer."""
    cfg = cfg or TinyModelConfig()
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    tokenizer.model_max_length = cfg.max_positions
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model, tokenizer


def warm_start(policy: Policy, task: Task, cfg: WarmStartConfig, *, progress: bool = True) -> list[float]:
    """Supervised training on train problems (prompt → answer + `</s>`); returns the loss per step."""
    rng = random.Random(cfg.seed)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    answer_ids = {
        p.id: policy.tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [policy.eos_id]
        for p in task.train_problems
    }
    losses: list[float] = []
    policy.model.train()
    columns = (
        TextColumn("warm start"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[loss]}"),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        job = bar.add_task("warm", total=cfg.steps, loss="")
        for _ in range(cfg.steps):
            batch = task.sample_train(cfg.batch_size, rng)
            out = policy.token_logprobs(
                [policy.encode_prompt(p.prompt) for p in batch], [answer_ids[p.id] for p in batch]
            )
            loss = -(out.logp.sum() / out.mask.sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(job, advance=1, loss=f"loss {losses[-1]:.3f}")
    policy.model.eval()
    return losses


def cache_root(cache_dir: Path | None = None) -> Path:
    """`cache_dir`, else `$R2VPO_CACHE_DIR`, else `~/.cache/r2vpo`."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("R2VPO_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "r2vpo"


def config_hash(model_cfg: TinyModelConfig, warm_cfg: WarmStartConfig, task_cfg: TaskConfig) -> str:
    """Short stable hash of everything that determines the default policy's weights."""
    blob = json.dumps(
        {
            "format": CACHE_FORMAT,
            "model": model_cfg.model_dump(),
            "warm": warm_cfg.model_dump(),
            "task": task_cfg.model_dump(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_default_policy(
    cache_dir: Path | None = None,
    *,
    model_cfg: TinyModelConfig | None = None,
    warm_cfg: WarmStartConfig | None = None,
    task_cfg: TaskConfig | None = None,
    progress: bool = True,
) -> Path:
    """Directory of the warm-started tiny policy, built once and cached under `<root>/tiny-<hash>/`.

    The directory is written in full to a temporary sibling and renamed into place, so a reader never
    sees a half-written policy; if two processes race, the first rename wins and the other's is discarded.
    """
    model_cfg, warm_cfg, task_cfg = (
        model_cfg or TinyModelConfig(),
        warm_cfg or WarmStartConfig(),
        task_cfg or TaskConfig(),
    )
    root = cache_root(cache_dir)
    final = root / f"tiny-{config_hash(model_cfg, warm_cfg, task_cfg)}"
    if (final / "r2vpo_meta.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    task = Task(task_cfg)
    model, tokenizer = build_tiny_model(model_cfg)
    policy = Policy(model, tokenizer)
    losses = warm_start(policy, task, warm_cfg, progress=progress)
    train_s = time.perf_counter() - started
    accuracy = greedy_accuracy(policy, task, task.heldout_problems)
    meta = {
        "format": CACHE_FORMAT,
        "model": model_cfg.model_dump(),
        "warm_start": warm_cfg.model_dump(),
        "task": task_cfg.model_dump(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "warm_start_seconds": round(train_s, 2),
        "final_loss": losses[-1] if losses else None,
        "heldout_greedy_accuracy": accuracy,
        "heldout_size": len(task.heldout_problems),
    }
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-tmp-", dir=root))
    try:
        policy.save(tmp)
        (tmp / "r2vpo_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "r2vpo_meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
