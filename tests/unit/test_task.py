"""The procedural task: dataset lookup, prompt format, train/held-out split, exact vs partial reward."""

from __future__ import annotations

import random

import pytest

from trainer.task import Task, TaskConfig


@pytest.fixture(scope="module")
def task() -> Task:
    return Task(TaskConfig(train_size=600, heldout_size=50))


def test_unknown_task_name_lists_available_datasets():
    with pytest.raises(ValueError) as err:
        Task(TaskConfig(name="no_such_task"))
    assert "no_such_task" in str(err.value)
    assert "chain_sum" in str(err.value) and "basic_arithmetic" in str(err.value)


def test_chain_sum_prompt_is_compact_expression_with_equals(task):
    problem = task.train_problems[0]
    assert problem.prompt.endswith("=") and " " not in problem.prompt
    assert problem.prompt == problem.entry["metadata"]["expression"].replace(" ", "") + "="
    assert problem.answer == problem.entry["answer"]
    assert problem.id.startswith("chain_sum:")


def test_heldout_prompts_never_appear_in_train(task):
    train = {p.prompt for p in task.train_problems}
    heldout = [p.prompt for p in task.heldout_problems]
    assert len(heldout) == 50 and len(set(heldout)) == 50
    assert len(train) == len(task.train_problems) == 600
    assert not train & set(heldout)


def test_default_split_is_deduplicated_and_reproducible():
    first, second = Task(), Task()
    assert [p.id for p in first.heldout_problems] == [p.id for p in second.heldout_problems]
    prompts = [p.prompt for p in first.train_problems + first.heldout_problems]
    assert len(prompts) == len(set(prompts))
    assert len(first.heldout_problems) == 200 and len(first.train_problems) > 3000


def test_sample_train_draws_distinct_problems_from_train_set(task):
    batch = task.sample_train(32, random.Random(1))
    assert len({p.id for p in batch}) == 32
    assert {p.id for p in batch} <= {p.id for p in task.train_problems}
    assert [p.id for p in task.sample_train(8, random.Random(3))] == [
        p.id for p in task.sample_train(8, random.Random(3))
    ]


def test_reward_is_exact_by_default_and_partial_only_when_asked(task):
    problem = next(p for p in task.train_problems if p.answer == "14")
    assert task.score(problem, "14") == 1.0
    assert task.score(problem, " 14\n") == 1.0
    assert task.score(problem, "140") == 0.0
    assert task.score(problem, "13") == 0.0
    partial = Task(TaskConfig(train_size=600, heldout_size=50, partial_credit=True))
    same = next(p for p in partial.train_problems if p.id == problem.id)
    assert partial.score(same, "140") == pytest.approx(2 / 3)
    assert partial.score(same, "14") == 1.0
    assert not partial.is_correct(same, "140") and partial.is_correct(same, "14")


def test_other_datasets_use_the_question_as_prompt():
    other = Task(TaskConfig(name="basic_arithmetic", params={}, train_size=20, heldout_size=5))
    problem = other.train_problems[0]
    assert problem.prompt == problem.entry["question"]
    assert other.is_correct(problem, problem.answer)
