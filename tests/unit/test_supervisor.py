"""`r2vpo up` supervisor: a dead child is restarted; one exiting with EXIT_DO_NOT_RESTART ends the run."""

from __future__ import annotations

import sys
import time

import pytest

from services.supervisor import EXIT_DO_NOT_RESTART, Child, Supervisor


def _exited_child(tmp_path, code: int) -> Child:
    child = Child(
        name="learner",
        args=[sys.executable, "-c", f"import sys; sys.exit({code})"],
        url="http://127.0.0.1:9",  # never asked: these children never get ready
        log_path=tmp_path / f"exit{code}.log",
    )
    child.start()
    assert child.process is not None
    child.process.wait(timeout=30)
    return child


def test_a_child_that_exits_with_do_not_restart_ends_the_run(tmp_path):
    supervisor = Supervisor(max_restarts=5, backoff_s=0.0)
    supervisor.children.append(_exited_child(tmp_path, EXIT_DO_NOT_RESTART))

    with pytest.raises(RuntimeError, match=r"learner stopped for a reason a restart cannot fix \(exit 3\)"):
        supervisor.check()
    assert supervisor.events == []  # no restart was scheduled


def test_a_child_that_crashes_is_scheduled_for_a_restart(tmp_path):
    supervisor = Supervisor(max_restarts=5, backoff_s=0.0)
    child = _exited_child(tmp_path, 1)
    supervisor.children.append(child)

    assert supervisor.check() == []  # the restart is scheduled after the backoff
    assert [(e["service"], e["exit_code"]) for e in supervisor.events] == [("learner", 1)]
    time.sleep(0.01)
    assert supervisor.check() == ["learner"]
    assert child.restarts == 1
    child.process.wait(timeout=30)
