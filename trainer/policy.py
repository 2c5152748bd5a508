"""The policy: the one place where log-probs are computed and tokens are sampled.

The learner (`token_logprobs`, teacher-forced, with gradients) and the torch inference engine (`sample`,
KV cache) share this module, so the behaviour/trainer log-prob mismatch is only floating-point noise.

Conventions: a prompt is a list of token ids that already starts with `<s>` (see `encode_prompt`); a
completion is the list of sampled ids, ending with `</s>` when the model stopped. Log-probs are of the
tempered distribution `log_softmax(logits / temperature)`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedTokenizerBase,
)

from trainer.device import to_cpu

if TYPE_CHECKING:
    from trainer.task import Problem, Task


class PolicyLoadError(ValueError):
    """A directory that cannot be loaded as a causal-LM policy (the message names the path)."""


@dataclass
class LogProbs:
    """Per completion token: `logp[i, t]`, validity `mask[i, t]`, optional `entropy[i, t]` ([B, T])."""

    logp: Tensor
    mask: Tensor
    entropy: Tensor | None = None


@dataclass
class Sampled:
    """One sampled completion: its token ids (incl. a final eos on "stop") and their log-probs."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


class Policy:
    """A causal LM and its tokenizer with the log-prob and sampling code the whole system uses."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.bos_id: int | None = tokenizer.bos_token_id
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
            eos = eos[0] if isinstance(eos, list) else eos
        if eos is None:
            raise PolicyLoadError("the tokenizer and model config define no eos token")
        self.eos_id: int = int(eos)
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        params = inspect.signature(self.model.forward).parameters
        # transformers >= 5.2x names the KV cache argument `cache`; older versions `past_key_values`.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # --- loading and saving -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> Policy:
        """Load a local HF-format causal LM directory (never the hub); PolicyLoadError if it is not one."""
        path = Path(path)
        if not path.is_dir():
            raise PolicyLoadError(f"policy directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise PolicyLoadError(f"{path} has no config.json: not a Hugging Face model directory")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=dtype, local_files_only=True
            )
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise PolicyLoadError(f"{path} does not hold a causal language model: {exc}") from exc
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise PolicyLoadError(f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise PolicyLoadError(f"{path} has an unloadable tokenizer: {exc}") from exc
        return cls(model, tokenizer, device=device)

    def save(self, path: str | Path) -> None:
        """Write model (safetensors, from CPU copies of the weights) and tokenizer in HF format, loadable by
        transformers and vLLM on any machine."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, state_dict=to_cpu(self.model.state_dict()), safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        _portable_tokenizer_config(path / "tokenizer_config.json")

    # --- text <-> ids -----------------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of `text` with `<s>` prepended (when the tokenizer has one)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids if self.bos_id is None else [self.bos_id, *ids]

    def decode(self, token_ids: list[int]) -> str:
        """The text before the first eos, special tokens skipped."""
        ids = list(token_ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- teacher-forced log-probs (the learner's path) ----------------------------------------------

    def token_logprobs(
        self,
        prompt_ids: list[list[int]],
        completion_ids: list[list[int]],
        *,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> LogProbs:
        """Log-prob of each completion token given prompt + earlier completion tokens; one forward pass.

        Sequences are right-padded with explicit position ids, so positions equal those `sample` used.
        Gradients flow: wrap the call in `torch.no_grad()` where none are wanted.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
        if len(prompt_ids) != len(completion_ids):
            raise ValueError("prompt_ids and completion_ids must have the same batch size")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token (the bos)")
        batch, dev = len(prompt_ids), self.device
        n_comp = max((len(c) for c in completion_ids), default=0)
        seq_len = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True))
        input_ids = torch.full((batch, seq_len), self.pad_id, dtype=torch.long)
        attn = torch.zeros((batch, seq_len), dtype=torch.long)
        targets = torch.full((batch, n_comp), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, n_comp), dtype=torch.bool)
        index = torch.zeros((batch, n_comp), dtype=torch.long)  # position whose logits predict token t
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            attn[i, : len(p) + len(c)] = 1
            targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, : len(c)] = True
            index[i] = torch.arange(len(p) - 1, len(p) - 1 + n_comp).clamp(max=seq_len - 1)
        positions = torch.arange(seq_len).expand(batch, seq_len)
        out = self.model(
            input_ids=input_ids.to(dev), attention_mask=attn.to(dev), position_ids=positions.to(dev)
        )
        logits = out.logits.float()
        index, targets, mask = index.to(dev), targets.to(dev), mask.to(dev)
        picked = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1])) / temperature
        logprobs_all = torch.log_softmax(picked, dim=-1)
        logp = logprobs_all.gather(-1, targets[..., None]).squeeze(-1) * mask
        entropy = None
        if with_entropy:
            entropy = -(logprobs_all.exp() * logprobs_all).sum(-1) * mask
        return LogProbs(logp=logp, mask=mask, entropy=entropy)

    # --- sampling with a KV cache (the inference engine's path) --------------------------------------

    @torch.no_grad()
    def sample(
        self,
        prompt_ids: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | Sequence[tuple[int, torch.Generator]] | None = None,
    ) -> list[Sampled]:
        """Sample a completion per prompt: left-padded prefill, then one token per step on a KV cache.

        `generator` is one generator for the batch, or consecutive runs of rows `[(rows, generator), ...]`
        (rows summing to the batch) each drawing from its own generator: a run then draws what a `sample`
        call of its rows alone with that generator would (the inference engine batches seeded requests so).

        `temperature == 0` is greedy (log-probs then of `log_softmax(logits)`). With `top_p < 1` the
        reported log-prob is of the renormalised nucleus, the distribution actually sampled; the
        learner's `token_logprobs` knows no nucleus, so training on top_p < 1 samples has a mismatch.
        """
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token (the bos)")
        batch, dev = len(prompt_ids), self.device
        if isinstance(generator, Sequence) and sum(rows for rows, _ in generator) != batch:
            raise ValueError(
                f"generator runs cover {sum(r for r, _ in generator)} rows, the batch has {batch}"
            )
        if batch == 0 or max_new_tokens <= 0:
            return [Sampled([], [], "length") for _ in range(batch)]
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((batch, width), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[i, width - len(p) :] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        out = self.model(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        next_pos = positions[:, -1:] + 1
        tokens = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=dev)
        logps = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=dev)
        finished = torch.zeros(batch, dtype=torch.bool, device=dev)
        lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=dev)
        for step in range(max_new_tokens):
            token, logp = self._pick(out.logits[:, -1].float(), temperature, top_p, generator)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            tokens[:, step], logps[:, step] = token, logp
            stopped = (token == self.eos_id) & ~finished
            lengths = torch.where(stopped, torch.full_like(lengths, step + 1), lengths)
            finished |= stopped
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            attn = torch.cat([attn, torch.ones((batch, 1), dtype=attn.dtype, device=dev)], dim=1)
            out = self.model(
                input_ids=token[:, None],
                attention_mask=attn,
                position_ids=next_pos,
                use_cache=True,
                **{self._cache_kw: cache},
            )
            next_pos = next_pos + 1
        tokens_l, logps_l, lengths_l = tokens.tolist(), logps.tolist(), lengths.tolist()
        finished_l = finished.tolist()
        return [
            Sampled(
                tokens_l[i][: lengths_l[i]], logps_l[i][: lengths_l[i]], "stop" if finished_l[i] else "length"
            )
            for i in range(batch)
        ]

    def _new_cache(self) -> DynamicCache:
        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    @staticmethod
    def _pick(
        logits: Tensor,
        temperature: float,
        top_p: float,
        generator: torch.Generator | Sequence[tuple[int, torch.Generator]] | None,
    ) -> tuple[Tensor, Tensor]:
        """Choose one token per row; return it and its log-prob under the distribution sampled."""
        if isinstance(generator, Sequence) and temperature != 0:  # runs of rows, each its own generator
            parts = logits.split([rows for rows, _ in generator])
            picks = [
                Policy._pick(part, temperature, top_p, g)
                for part, (_, g) in zip(parts, generator, strict=True)
            ]
            return torch.cat([token for token, _ in picks]), torch.cat([logp for _, logp in picks])
        if temperature == 0:
            token = logits.argmax(-1)
            return token, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
        scaled = logits / temperature
        if top_p < 1:
            sorted_logits, order = scaled.sort(-1, descending=True)
            probs = torch.softmax(sorted_logits, -1)
            drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix with mass >= top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
        logprobs = torch.log_softmax(scaled, -1)
        token = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
        return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


def _portable_tokenizer_config(config_file: Path) -> None:
    """Name the tokenizer class `PreTrainedTokenizerFast` so transformers 4.x (e.g. vLLM's) loads it too."""
    if not config_file.is_file():
        return
    data = json.loads(config_file.read_text())
    if data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def greedy_accuracy(
    policy: Policy, task: Task, problems: list[Problem], *, max_new_tokens: int = 8, batch_size: int = 256
) -> float:
    """Fraction of `problems` whose greedy completion the task's scorer marks exactly right."""
    if not problems:
        return 0.0
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        samples = policy.sample(
            [policy.encode_prompt(p.prompt) for p in chunk], max_new_tokens=max_new_tokens, temperature=0.0
        )
        correct += sum(
            task.is_correct(p, policy.decode(s.token_ids)) for p, s in zip(chunk, samples, strict=True)
        )
    return correct / len(problems)
