"""Built-in scorers, each a plain function with the SDK signature `fn(prompt, completion, metadata)`.

- `reasoning_gym_scorer(dataset, **params)`: the dataset's own `score_answer`, on the entry the rollout
  side sends as `metadata["entry"]`.
- `exact_match`: stripped completion == `metadata["answer"]`.
- `math_verify_scorer`: math_verify equivalence of `metadata["answer"]` and the completion.
- `length_penalty`, `format_shaping`: optional shaping terms; `combine` sums weighted parts.

A missing field or a failing scorer raises, so the service answers an error, never a reward of 0.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

import reasoning_gym

from client.plugin import Score, ScoreFn, ScoringError, as_score
from services.reward.mathcheck import MathChecker

BUILTINS = ("reasoning_gym", "exact_match", "math_verify")


class BadMetadata(ScoringError, ValueError):
    """The request lacks what the scorer needs: the caller's mistake, answered with 422 (not 500)."""

    def __init__(self, message: str) -> None:
        super().__init__(422, "bad_request", message)


def _field(metadata: dict[str, Any], key: str, what: str) -> Any:
    if key not in metadata:
        raise BadMetadata(f"metadata[{key!r}] is missing: the rollout side must send {what}")
    return metadata[key]


def reasoning_gym_scorer(dataset: str, *, partial_credit: bool = False, **params: Any) -> ScoreFn:
    """Score with reasoning-gym's `score_answer` of `dataset` (built with `params`). Without partial
    credit the reward is 1.0 only for a full score (chain_sum gives "140" for "14" about 0.67)."""
    scorer = reasoning_gym.create_dataset(dataset, size=1, seed=0, **params)  # unknown name: ValueError now

    def score(prompt: str, completion: str, metadata: dict[str, Any]) -> Score:
        entry = _field(metadata, "entry", "the reasoning-gym entry dict")
        if not isinstance(entry, dict) or not isinstance(entry.get("answer"), str):
            raise BadMetadata("metadata['entry'] must be a reasoning-gym entry dict with a string 'answer'")
        if not isinstance(entry.get("metadata", {}), dict):
            raise BadMetadata("metadata['entry']['metadata'] must be a dict")
        raw = float(scorer.score_answer(answer=completion.strip(), entry=entry))
        reward = raw if partial_credit else (1.0 if raw == 1.0 else 0.0)
        return Score(
            reward=reward, details={"dataset": dataset, "score": raw, "partial_credit": partial_credit}
        )

    score.__name__ = f"reasoning_gym:{dataset}"
    return score


def exact_match(prompt: str, completion: str, metadata: dict[str, Any]) -> Score:
    """1.0 when the stripped completion equals `metadata["answer"]`, else 0.0."""
    answer = str(_field(metadata, "answer", "the reference answer")).strip()
    return Score(reward=float(completion.strip() == answer), details={"answer": answer})


class MathVerifyScorer:
    """1.0 when math_verify finds the completion equal to `metadata["answer"]` ("\\frac{1}{2}" == "0.5"),
    computed in a worker process under a hard time limit (past it: an error, not 0)."""

    __name__ = "math_verify"

    def __init__(self, timeout_s: float = 5.0) -> None:
        self._checker = MathChecker(timeout_s=timeout_s)

    def __call__(self, prompt: str, completion: str, metadata: dict[str, Any]) -> Score:
        gold = str(_field(metadata, "answer", "the reference answer"))
        equal, gold_parsed, answer_parsed = self._checker.equivalent(gold, completion)
        return Score(reward=float(equal), details={"gold": gold_parsed, "parsed": answer_parsed})

    def close(self) -> None:
        """Stop the worker process (the reward service calls this at shutdown)."""
        self._checker.close()


math_verify_scorer = MathVerifyScorer()  # its worker process starts on the first call


def length_penalty(max_chars: int, weight: float = 1.0) -> ScoreFn:
    """Shaping: 0 up to `max_chars`, then falls linearly to `-weight` at twice that length (and stays)."""
    if max_chars < 1 or weight < 0:
        raise ValueError("max_chars must be >= 1 and weight >= 0")

    def penalty(prompt: str, completion: str, metadata: dict[str, Any]) -> Score:
        excess = max(0, len(completion) - max_chars)
        return Score(reward=-weight * min(1.0, excess / max_chars), details={"chars": len(completion)})

    penalty.__name__ = "length_penalty"
    return penalty


def format_shaping(pattern: str = r"-?\d+", weight: float = 0.1) -> ScoreFn:
    """Shaping: `weight` when the stripped completion fully matches `pattern` (default: an integer)."""
    regex = re.compile(pattern)

    def shaping(prompt: str, completion: str, metadata: dict[str, Any]) -> Score:
        matched = regex.fullmatch(completion.strip()) is not None
        return Score(reward=weight if matched else 0.0, details={"matched": matched})

    shaping.__name__ = "format_shaping"
    return shaping


def combine(parts: Sequence[tuple[ScoreFn, float]]) -> ScoreFn:
    """Weighted sum of sync scorers; `details["parts"]` keeps each part's reward, weight and details."""
    if not parts:
        raise ValueError("combine needs at least one (scorer, weight) part")
    for fn, _ in parts:
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):  # noqa: B004
            raise TypeError(f"combine takes sync scorers; {fn!r} is async")
    names = [getattr(fn, "__name__", type(fn).__name__) for fn, _ in parts]

    def combined(prompt: str, completion: str, metadata: dict[str, Any]) -> Score:
        total, details = 0.0, []
        for name, (fn, weight) in zip(names, parts, strict=True):
            part = as_score(fn(prompt, completion, metadata))
            total += weight * part.reward
            details.append({"name": name, "weight": weight, "reward": part.reward, "details": part.details})
        return Score(reward=total, details={"parts": details})

    combined.__name__ = "combine(" + ", ".join(names) + ")"
    return combined


def builtin_scorer(
    name: str,
    *,
    dataset: str = "chain_sum",
    dataset_params: dict[str, Any] | None = None,
    partial_credit: bool = False,
    timeout_s: float = 5.0,
) -> ScoreFn:
    """The built-in scorer called `name` (one of BUILTINS), configured."""
    if name == "reasoning_gym":
        return reasoning_gym_scorer(dataset, partial_credit=partial_credit, **(dataset_params or {}))
    if name == "exact_match":
        return exact_match
    if name == "math_verify":
        return MathVerifyScorer(timeout_s=timeout_s)
    raise ValueError(f"unknown built-in scorer {name!r}; built-ins: {', '.join(BUILTINS)}")
