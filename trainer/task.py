"""The procedural task (DESIGN §7): a reasoning-gym dataset split into train and held-out problems.

The default, `chain_sum` with three one-digit terms, is written compactly as `4-1-7=` so the tiny
character-level policy sees 7 tokens. Rewards come from the dataset's own `score_answer`.
"""

from __future__ import annotations

import json
import random
from typing import Any

import reasoning_gym
from pydantic import BaseModel, ConfigDict, Field
from reasoning_gym.factory import DATASETS

# Draw at most this many entries per wanted distinct problem before giving up on finding more.
_DRAWS_PER_PROBLEM = 10


class TaskConfig(BaseModel):
    """Which reasoning-gym dataset, its parameters, and the train / held-out split."""

    model_config = ConfigDict(extra="forbid")

    name: str = "chain_sum"
    params: dict[str, Any] = Field(
        default_factory=lambda: {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}
    )
    train_size: int = Field(4000, ge=1)
    heldout_size: int = Field(200, ge=0)
    seed: int = 0
    # False: reward 1 only for an exactly right answer (chain_sum's scorer gives "140" 0.67 for "14").
    partial_credit: bool = False


class Problem(BaseModel):
    """One problem: a stable id, the prompt the model sees, the reference answer, the raw entry."""

    id: str
    prompt: str
    answer: str
    entry: dict[str, Any]


def available_tasks() -> list[str]:
    """Names of all registered reasoning-gym datasets."""
    return sorted(DATASETS)


class Task:
    """A deduplicated problem set: `heldout_problems` first, then up to `train_size` train problems."""

    def __init__(self, config: TaskConfig | None = None) -> None:
        self.config = config = config or TaskConfig()
        if config.name not in DATASETS:
            raise ValueError(
                f"unknown task {config.name!r}; reasoning-gym datasets: {', '.join(available_tasks())}"
            )
        wanted = config.train_size + config.heldout_size
        draws = max(_DRAWS_PER_PROBLEM * wanted, 1000)
        self.dataset = reasoning_gym.create_dataset(
            config.name, size=draws, seed=config.seed, **config.params
        )
        problems: list[Problem] = []
        seen: set[str] = set()
        for index in range(draws):
            entry = self.dataset[index]
            prompt = self.format_prompt(entry)
            if prompt in seen:
                continue
            seen.add(prompt)
            problems.append(
                Problem(
                    id=f"{config.name}:{index}",
                    prompt=prompt,
                    answer=str(entry["answer"]),
                    entry=json.loads(json.dumps(entry, default=str)),
                )
            )
            if len(problems) == wanted:
                break
        if len(problems) <= config.heldout_size:
            raise ValueError(
                f"task {config.name!r} yielded only {len(problems)} distinct problems in {draws} draws; "
                f"need more than heldout_size={config.heldout_size}"
            )
        # Held-out first: it stays the same when train_size changes.
        self.heldout_problems: list[Problem] = problems[: config.heldout_size]
        self.train_problems: list[Problem] = problems[config.heldout_size :]

    def format_prompt(self, entry: dict[str, Any]) -> str:
        """`4-1-7=` for chain_sum (compact expression); the dataset's question otherwise."""
        expression = entry.get("metadata", {}).get("expression")
        if self.config.name == "chain_sum" and isinstance(expression, str):
            return expression.replace(" ", "") + "="
        return str(entry["question"])

    def sample_train(self, n: int, rng: random.Random) -> list[Problem]:
        """`n` training problems: distinct when `n` <= the train set, drawn with replacement otherwise."""
        if n <= len(self.train_problems):
            return rng.sample(self.train_problems, n)
        return rng.choices(self.train_problems, k=n)

    def raw_score(self, problem: Problem, completion_text: str) -> float:
        """The dataset's own `score_answer` on the stripped completion."""
        return float(self.dataset.score_answer(completion_text.strip(), problem.entry))

    def score(self, problem: Problem, completion_text: str) -> float:
        """The training reward: the raw score, or 1/0 on exactness when `partial_credit` is off."""
        raw = self.raw_score(problem, completion_text)
        if self.config.partial_credit:
            return raw
        return 1.0 if raw == 1.0 else 0.0

    def is_correct(self, problem: Problem, completion_text: str) -> bool:
        """Exactly right by the dataset's scorer (accuracy never counts partial credit)."""
        return self.raw_score(problem, completion_text) == 1.0
