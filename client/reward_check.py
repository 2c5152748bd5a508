"""The contract check of a reward service (`r2vpo check-reward URL`): does any service, written with this
SDK or not, answer `/healthz`, `/score` and `/score_batch` as DESIGN §3 says?"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from client.schemas import ScoreBatchResponse, ScoreRequest, ScoreResponse

__all__ = ["CheckResult", "check_reward_main", "check_reward_service"]


@dataclass(frozen=True)
class CheckResult:
    """One contract check of a reward service."""

    name: str
    ok: bool
    message: str


# Understood by the built-ins: exact_match / math_verify read "answer", reasoning_gym reads "entry".
_SAMPLE = ScoreRequest(
    id="r2vpo-check-0",
    prompt="What is 2 + 2?",
    completion="4",
    task="check",
    metadata={"answer": "4", "entry": {"question": "What is 2 + 2?", "answer": "4", "metadata": {}}},
)


def _post(http: httpx.Client, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = http.post(path, **kwargs)
    try:
        return response.status_code, json.loads(response.content)  # NaN literals parse, then fail validation
    except ValueError:
        return response.status_code, response.content[:80]


def _check_health(http: httpx.Client, sample: ScoreRequest) -> tuple[bool, str]:
    status = http.get("/healthz").status_code
    return status == 200, f"HTTP {status}"


def _check_score(http: httpx.Client, sample: ScoreRequest) -> tuple[bool, str]:
    status, body = _post(http, "/score", json=sample.model_dump(mode="json"))
    if status != 200:
        return False, f"HTTP {status}: {body}"
    try:
        return True, f"reward {ScoreResponse.model_validate(body).reward} for the sample request"
    except ValidationError as exc:
        return False, f"not a valid ScoreResponse with a finite reward: {exc.errors()[0]['msg']} ({body})"


def _check_malformed(http: httpx.Client, sample: ScoreRequest) -> tuple[bool, str]:
    statuses = [
        _post(http, "/score", content=b"{not json", headers={"content-type": "application/json"})[0],
        _post(http, "/score", json={"prompt": 1})[0],
    ]
    ok = all(400 <= s < 500 for s in statuses)
    return ok, f"non-JSON body -> HTTP {statuses[0]}, missing fields -> HTTP {statuses[1]} (want 4xx)"


def _check_batch(http: httpx.Client, sample: ScoreRequest) -> tuple[bool, str]:
    items = [
        sample.model_copy(update={"id": f"{sample.id}-{i}", "completion": c}) for i, c in enumerate("454")
    ]
    status, body = _post(http, "/score_batch", json={"items": [i.model_dump(mode="json") for i in items]})
    if status in (404, 405):
        return True, "no /score_batch (optional)"
    try:
        results = ScoreBatchResponse.model_validate(body).results if status == 200 else None
    except ValidationError as exc:
        return False, f"not a valid ScoreBatchResponse: {exc.errors()[0]['msg']}"
    if results is None:
        return False, f"HTTP {status}: {body}"
    if len(results) != len(items):
        return False, f"{len(results)} results for {len(items)} items"
    singles = [
        ScoreResponse.model_validate(_post(http, "/score", json=i.model_dump(mode="json"))[1]) for i in items
    ]
    if [r.reward for r in results] != [r.reward for r in singles]:
        return (
            False,
            f"batch rewards {[r.reward for r in results]} != single rewards {[r.reward for r in singles]}",
        )
    return True, f"{len(results)} results, in order"


_CHECKS: tuple[tuple[str, Callable[[httpx.Client, ScoreRequest], tuple[bool, str]]], ...] = (
    ("healthz answers 200", _check_health),
    ("score returns a finite reward", _check_score),
    ("malformed body gets 4xx", _check_malformed),
    ("score_batch keeps order", _check_batch),
)


def check_reward_service(
    url: str, *, timeout: float = 10.0, sample: ScoreRequest | None = None
) -> list[CheckResult]:
    """Run the contract checks against the service at `url`; pass `sample` if the default request (2 + 2,
    answer 4) does not suit your scorer."""
    sample = sample or _SAMPLE
    results = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout) as http:
        for name, check in _CHECKS:
            try:
                ok, message = check(http, sample)
            except (httpx.HTTPError, ValidationError) as exc:
                ok, message = False, f"{type(exc).__name__}: {exc}"
            results.append(CheckResult(name, ok, message))
    return results


def check_reward_main(url: str, *, timeout: float = 10.0) -> int:
    """Print the contract checks as a table; exit code 0 when all pass, else 1."""
    from rich.console import Console
    from rich.table import Table

    results = check_reward_service(url, timeout=timeout)
    table = Table(title=f"reward service {url}")
    for column in ("check", "result", "message"):
        table.add_column(column)
    for r in results:
        table.add_row(r.name, "[green]pass[/]" if r.ok else "[red]FAIL[/]", r.message)
    Console().print(table)
    return 0 if all(r.ok for r in results) else 1
