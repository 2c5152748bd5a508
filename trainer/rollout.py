"""In-process rollouts for the synchronous trainer: G samples per prompt, scored, as trajectory groups.

The asynchronous pipeline does the same over HTTP (services/rollout); both produce `TrajectoryGroup`s, so the
learner cannot tell them apart.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import torch

from client.schemas import Completion, TrajectoryGroup


def generate_groups(
    policy: Any,
    task: Any,
    problems: list[Any],
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    version: int,
    generator: torch.Generator | None = None,
    run: str = "default",
) -> list[TrajectoryGroup]:
    """Sample `group_size` completions for each problem with the current policy and score them."""
    started = time.perf_counter()
    prompts = [policy.encode_prompt(p.prompt) for p in problems]
    repeated = [ids for ids in prompts for _ in range(group_size)]
    samples = policy.sample(
        repeated, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator
    )
    generation_s = time.perf_counter() - started
    groups = []
    for i, problem in enumerate(problems):
        completions = []
        for s in samples[i * group_size : (i + 1) * group_size]:
            text = policy.decode(s.token_ids)
            completions.append(
                Completion(
                    token_ids=s.token_ids,
                    behavior_logprobs=s.logprobs,
                    reward=task.score(problem, text),
                    policy_version=version,
                    text=text,
                    finish_reason=s.finish_reason,
                )
            )
        groups.append(
            TrajectoryGroup(
                group_id=uuid.uuid4().hex,
                run=run,
                task=task.config.name,
                problem_id=problem.id,
                prompt=problem.prompt,
                prompt_token_ids=prompts[i],
                completions=completions,
                generation_s=generation_s / len(problems),
            )
        )
    return groups
