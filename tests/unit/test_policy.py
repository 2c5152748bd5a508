"""The policy: teacher-forced log-probs, KV-cache sampling that agrees with them, loading and saving."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from trainer.policy import Policy, PolicyLoadError, greedy_accuracy
from trainer.task import Task, TaskConfig
from trainer.tiny import TinyModelConfig, build_tiny_model

PROMPTS = ["4-1-7=", "12+3+45-6=", "9=", "1+1+1+1+1+1+1+1+1="]


@pytest.fixture(scope="module")
def policy() -> Policy:
    model, tok = build_tiny_model(TinyModelConfig(seed=3))
    return Policy(model, tok)


def _recompute(policy: Policy, prompts, samples, temperature: float) -> list[torch.Tensor]:
    with torch.no_grad():
        out = policy.token_logprobs(prompts, [s.token_ids for s in samples], temperature=temperature)
    return [out.logp[i, : len(s.token_ids)] for i, s in enumerate(samples)]


def test_encode_prepends_bos_and_decode_stops_at_eos(policy):
    ids = policy.encode_prompt("4-1-7=")
    assert ids[0] == policy.bos_id and len(ids) == 7
    assert policy.decode(ids) == "4-1-7="
    body = policy.encode_prompt("14")[1:]
    assert policy.decode([*body, policy.eos_id, *body]) == "14"


def test_sampled_logprobs_match_teacher_forced_recompute_with_left_padding(policy):
    prompts = [policy.encode_prompt(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    gen = torch.Generator().manual_seed(0)
    samples = policy.sample(prompts, max_new_tokens=12, temperature=0.7, generator=gen)
    recomputed = _recompute(policy, prompts, samples, 0.7)
    for s, ref in zip(samples, recomputed, strict=True):
        assert len(s.token_ids) > 0
        diff = (torch.tensor(s.logprobs) - ref).abs().max().item()
        assert diff < 1e-4


def test_batched_sampling_matches_each_prompt_alone_when_greedy(policy):
    prompts = [policy.encode_prompt(p) for p in PROMPTS]
    batched = policy.sample(prompts, max_new_tokens=10, temperature=0.0)
    for p, b in zip(prompts, batched, strict=True):
        alone = policy.sample([p], max_new_tokens=10, temperature=0.0)[0]
        assert alone.token_ids == b.token_ids
        assert alone.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_greedy_is_deterministic_and_reports_untempered_logprobs(policy):
    prompts = [policy.encode_prompt(p) for p in PROMPTS]
    a = policy.sample(prompts, max_new_tokens=8, temperature=0.0)
    b = policy.sample(prompts, max_new_tokens=8, temperature=0.0)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    for s, ref in zip(a, _recompute(policy, prompts, a, 1.0), strict=True):
        assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-4)


def test_same_generator_seed_gives_same_samples(policy):
    prompts = [policy.encode_prompt(p) for p in PROMPTS] * 4

    def draw(seed):
        out = policy.sample(prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(seed))
        return [s.token_ids for s in out]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_top_p_logprobs_are_of_the_renormalised_nucleus(policy):
    prompts = [policy.encode_prompt(p) for p in PROMPTS]
    gen = torch.Generator().manual_seed(1)
    samples = policy.sample(prompts, max_new_tokens=6, temperature=1.0, top_p=0.5, generator=gen)
    for s, ref in zip(samples, _recompute(policy, prompts, samples, 1.0), strict=True):
        assert all(lp >= r - 1e-5 for lp, r in zip(s.logprobs, ref.tolist(), strict=True))
    greedy = policy.sample(prompts, max_new_tokens=6, temperature=1.0, top_p=1e-6, generator=gen)
    assert [s.token_ids for s in greedy] == [
        s.token_ids for s in policy.sample(prompts, max_new_tokens=6, temperature=0)
    ]
    assert all(abs(lp) < 1e-6 for s in greedy for lp in s.logprobs)


def test_nothing_is_returned_after_eos_and_finish_reasons_are_right():
    model, tok = build_tiny_model()
    plain = Policy(model, tok)
    prompts = [plain.encode_prompt("4-1-7="), plain.encode_prompt("1="), plain.encode_prompt("22+3=")]
    free = plain.sample(prompts[:1], max_new_tokens=4, temperature=0.0)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 4 == len(free.logprobs)

    wrapped = _EosAfter(model, plain.eos_id, after=[0, 2, 99])
    forced = Policy(wrapped, tok).sample(prompts, max_new_tokens=5, temperature=0.7)
    assert [len(s.token_ids) for s in forced] == [1, 3, 5]
    assert [s.finish_reason for s in forced] == ["stop", "stop", "length"]
    for s in forced:
        assert len(s.logprobs) == len(s.token_ids)
        assert plain.eos_id not in s.token_ids[:-1]
    assert forced[0].token_ids == [plain.eos_id] and forced[1].token_ids[-1] == plain.eos_id

    wrapped.forwards = 0
    Policy(wrapped, tok).sample(prompts[:2], max_new_tokens=8, temperature=0.7)
    assert wrapped.forwards == 3  # prefill + 2 steps: the loop ends once every row has stopped


class _EosAfter(torch.nn.Module):
    """Wraps a causal LM so that row i emits eos with certainty after `after[i]` generated tokens."""

    def __init__(self, model, eos_id: int, after: list[int]) -> None:
        super().__init__()
        self.inner, self.eos_id, self.after, self.config = model, eos_id, after, model.config
        self.generated = self.forwards = 0

    def forward(self, input_ids=None, cache=None, past_key_values=None, **kwargs):
        kw = {"cache": cache} if cache is not None else {"past_key_values": past_key_values}
        out = self.inner(input_ids=input_ids, **kw, **kwargs)
        self.forwards += 1
        self.generated = 0 if input_ids.shape[1] > 1 else self.generated + 1
        for row, after in enumerate(self.after[: input_ids.shape[0]]):
            if self.generated >= after:
                out.logits[row, :, self.eos_id] = 1e4
        return out


def test_token_logprobs_shapes_masks_entropy_and_gradients(policy):
    prompts = [policy.encode_prompt(p) for p in PROMPTS[:3]]
    completions = [[5, 6, 2], [7], []]
    out = policy.token_logprobs(prompts, completions, temperature=0.9, with_entropy=True)
    assert out.logp.shape == out.mask.shape == out.entropy.shape == (3, 3)
    assert out.mask.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    assert (out.logp[out.mask] < 0).all() and (out.logp[~out.mask] == 0).all()
    assert (out.entropy[out.mask] > 0).all()
    out.logp.sum().backward()
    assert policy.model.lm_head.weight.grad is not None
    policy.model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError):
        policy.token_logprobs(prompts, completions, temperature=0.0)


def test_saved_policy_reloads_to_identical_logprobs(policy, tmp_path):
    policy.save(tmp_path / "p")
    loaded = Policy.from_pretrained(tmp_path / "p")
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (policy.bos_id, policy.eos_id, policy.pad_id)
    prompts = [policy.encode_prompt(p) for p in PROMPTS]
    assert [loaded.encode_prompt(p) for p in PROMPTS] == prompts
    completions = [[10, 11, 12], [13], [14, 15], [2]]
    with torch.no_grad():
        a = policy.token_logprobs(prompts, completions).logp
        b = loaded.token_logprobs(prompts, completions).logp
    assert torch.equal(a, b)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(PolicyLoadError, match="nowhere"):
        Policy.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PolicyLoadError, match="config.json"):
        Policy.from_pretrained(empty)
    bert = tmp_path / "bert"
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(bert)
    with pytest.raises(PolicyLoadError, match=str(bert)):
        Policy.from_pretrained(bert)
    assert issubclass(PolicyLoadError, ValueError)


def test_model_without_tokenizer_is_rejected(tmp_path):
    model, _ = build_tiny_model()
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(PolicyLoadError, match="tokenizer"):
        Policy.from_pretrained(tmp_path / "m")


def test_greedy_accuracy_counts_exactly_right_answers(policy):
    task = Task(TaskConfig(train_size=50, heldout_size=20))
    acc = greedy_accuracy(policy, task, task.heldout_problems, batch_size=7)
    assert 0.0 <= acc <= 1.0
    assert greedy_accuracy(policy, task, []) == 0.0


def test_generator_runs_draw_as_each_run_alone_and_must_cover_the_batch(policy):
    prompts = [policy.encode_prompt(p) for p in ("1 + 2 =", "3 + 4 =", "5 + 6 =")]
    runs = [(2, torch.Generator().manual_seed(7)), (1, torch.Generator().manual_seed(8))]
    batched = policy.sample(prompts, max_new_tokens=8, generator=runs)
    first = policy.sample(prompts[:2], max_new_tokens=8, generator=torch.Generator().manual_seed(7))
    second = policy.sample(prompts[2:], max_new_tokens=8, generator=torch.Generator().manual_seed(8))
    assert [s.token_ids for s in batched] == [s.token_ids for s in first + second]

    with pytest.raises(ValueError, match="generator runs cover 2 rows, the batch has 3"):
        policy.sample(prompts, max_new_tokens=8, generator=[(2, torch.Generator())])
