"""The inference engine interface (DESIGN §6): one contract, two engines (`torch` here, `vllm` on GPUs).

An engine samples completions for token-id prompts, reports for every completion the log-prob of each
sampled token under the distribution actually sampled from (`log_softmax(logits / temperature)`, greedy:
`temperature == 0` → `log_softmax(logits)`) and the policy version that generated it, and swaps its
weights in place: `load_weights` returns once the new version serves, and no completion mixes versions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor


@dataclass(frozen=True)
class Generation:
    """One sampled completion: ids (ending with eos on "stop"), their log-probs, and its policy version."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    policy_version: int


class EngineClosed(RuntimeError):
    """The engine was closed (or its worker died) while a request waited on it."""


@runtime_checkable
class InferenceEngine(Protocol):
    """What the inference service needs from an engine. Methods may be called from any thread except
    where marked async (those run on the service's event loop and must not block it)."""

    model_name: str

    @property
    def version(self) -> int:
        """Policy version currently served."""
        ...

    @property
    def max_model_len(self) -> int:
        """Longest prompt + completion (tokens) the model handles."""
        ...

    @property
    def vocab_size(self) -> int:
        """Token ids must lie in `[0, vocab_size)`."""
        ...

    async def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int = 1,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[Generation]]:
        """Per prompt, `n` generations (the same `seed` and version give the same samples)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the bos token first."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """Text of `token_ids` up to the first eos, special tokens skipped."""
        ...

    def state_dict_template(self) -> Mapping[str, Tensor]:
        """Names, shapes and dtypes a weight update must match (tensors may be on the meta device)."""
        ...

    async def load_weights(self, state_dict: Mapping[str, Tensor], version: int) -> bool:
        """Swap to `state_dict` as `version` between batches; True once it serves, False when
        `version <= self.version` (a no-op). Raises ValueError (old weights kept) when it does not fit."""
        ...

    def close(self) -> None:
        """Stop accepting work and release the engine's resources; waiting requests fail."""
        ...
