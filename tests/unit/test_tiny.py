"""The embedded default policy: character tokenizer, tiny Llama, cached warm start."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import trainer.tiny as tiny
from trainer.policy import Policy
from trainer.task import TaskConfig
from trainer.tiny import TinyModelConfig, WarmStartConfig, build_tiny_model, build_tokenizer

PRINTABLE = "".join(chr(c) for c in range(32, 127))


def test_tokenizer_round_trips_every_printable_char_including_spaces():
    tok = build_tokenizer()
    text = PRINTABLE + "  two  spaces " + PRINTABLE[::-1]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert len(set(tok(PRINTABLE, add_special_tokens=False)["input_ids"])) == 95


def test_tokenizer_adds_no_special_tokens_and_maps_unknown_chars_to_unk():
    tok = build_tokenizer()
    assert tok("4-1-7=")["input_ids"] == tok("4-1-7=", add_special_tokens=False)["input_ids"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok("é\n\n", add_special_tokens=False)["input_ids"] == [3, 3, 3]


def test_vocab_size_is_99_and_matches_the_model():
    model, tok = build_tiny_model()
    assert len(tok) == 99 == model.config.vocab_size
    assert model.get_input_embeddings().weight.shape[0] == 99
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 669_184


def test_build_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, _ = build_tiny_model(TinyModelConfig(seed=1))
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = build_tiny_model(TinyModelConfig(seed=1))
    c, _ = build_tiny_model(TinyModelConfig(seed=2))
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_warm_start_lowers_the_supervised_loss():
    from trainer.task import Task

    model, tok = build_tiny_model()
    task = Task(TaskConfig(train_size=300, heldout_size=20))
    losses = tiny.warm_start(
        Policy(model, tok), task, WarmStartConfig(steps=15, batch_size=32), progress=False
    )
    assert len(losses) == 15 and losses[-1] < losses[0]


def test_ensure_default_policy_builds_once_then_reuses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("R2VPO_CACHE_DIR", str(tmp_path))
    calls = []
    real = tiny.warm_start

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny, "warm_start", counting)
    kwargs = dict(
        warm_cfg=WarmStartConfig(steps=3, batch_size=16),
        task_cfg=TaskConfig(train_size=200, heldout_size=20),
        progress=False,
    )
    first = tiny.ensure_default_policy(**kwargs)
    assert first.parent == tmp_path and first.name.startswith("tiny-")
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    second = tiny.ensure_default_policy(**kwargs)
    assert second == first and len(calls) == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-tmp")]

    meta = json.loads((first / "r2vpo_meta.json").read_text())
    assert 0.0 <= meta["heldout_greedy_accuracy"] <= 1.0
    assert meta["warm_start"]["steps"] == 3 and meta["task"]["heldout_size"] == 20

    model = AutoModelForCausalLM.from_pretrained(first)
    tok = AutoTokenizer.from_pretrained(first)
    assert model.config.vocab_size == len(tok) == 99
    assert (
        json.loads((first / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )

    other = tiny.ensure_default_policy(**{**kwargs, "warm_cfg": WarmStartConfig(steps=2, batch_size=16)})
    assert other != first and len(calls) == 2


def test_explicit_cache_dir_wins_over_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("R2VPO_CACHE_DIR", str(tmp_path / "env"))
    assert tiny.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert tiny.cache_root() == tmp_path / "env"
    monkeypatch.delenv("R2VPO_CACHE_DIR")
    assert tiny.cache_root().parts[-2:] == (".cache", "r2vpo")


@pytest.mark.parametrize("field", ["model_cfg", "warm_cfg", "task_cfg"])
def test_config_hash_changes_with_every_config(field):
    base = {"model_cfg": TinyModelConfig(), "warm_cfg": WarmStartConfig(), "task_cfg": TaskConfig()}
    changed = dict(base)
    changed[field] = base[field].model_copy(update={"seed": 7})
    h = tiny.config_hash(base["model_cfg"], base["warm_cfg"], base["task_cfg"])
    assert h != tiny.config_hash(changed["model_cfg"], changed["warm_cfg"], changed["task_cfg"])
