"""The `r2vpo` command line: one subcommand per verb (typer + rich)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

app = typer.Typer(add_completion=False, no_args_is_help=True, help="R²VPO asynchronous RL trainer.")
console = Console(stderr=True)


def _progress_columns() -> tuple:
    return (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


@app.command()
def train(
    sync: bool = typer.Option(
        True, "--sync/--async", help="--sync: one process; --async: the service pipeline"
    ),
    algo: str = typer.Option("r2vpo", help="objective: r2vpo | grpo | ppo | dapo | gspo | cispo | is"),
    steps: int = typer.Option(400, help="learner batches (16 prompts × 8 samples each by default)"),
    seed: int = typer.Option(0, help="seed of sampling, prompt order and initialisation"),
    lr: float = typer.Option(1e-4, help="learning rate (AdamW)"),
    updates_per_batch: int = typer.Option(1, help="optimizer steps on each batch"),
    lag: int = typer.Option(0, help="train on samples generated this many policy versions earlier"),
    run_dir: Path | None = typer.Option(None, help="run directory [default: runs/<algo>-s<seed>-lag<lag>]"),
    model: Path | None = typer.Option(None, help="HF causal LM directory [default: embedded tiny policy]"),
    task: str = typer.Option("chain_sum", help="reasoning-gym dataset name"),
    group_size: int = typer.Option(8, help="G, completions per prompt"),
    prompts_per_batch: int = typer.Option(16, help="prompts per batch"),
    eval_every: int = typer.Option(50, help="evaluate held-out accuracy every N batches"),
    var_budget: float | None = typer.Option(
        None, help="R²VPO δ: budget on the ratio variance [default: 0.04]"
    ),
    dual_lr: float | None = typer.Option(None, help="R²VPO η_λ: dual ascent step size [default: 0.1]"),
    checkpoint_every: int = typer.Option(0, help="checkpoint every N batches (0: at the end only)"),
    resume: bool = typer.Option(False, help="continue the run in --run-dir from its last checkpoint"),
    device: str | None = typer.Option(
        None, help="where the policy trains: cpu | cuda | cuda:N | auto (cuda if available) [default: cpu]"
    ),
    config: Path | None = typer.Option(None, help="JSON file of a full SyncTrainConfig (flags override)"),
) -> None:
    """Train a policy with R²VPO or a baseline objective."""
    if not sync:
        _fail("asynchronous training runs as services: use `r2vpo up --mode async`")
    from pydantic import ValidationError

    from trainer.policy import PolicyLoadError
    from trainer.sync import SyncTrainConfig, run_sync

    base = json.loads(config.read_text()) if config else {}
    overrides = {
        "run_dir": run_dir or Path("runs") / f"{algo}-s{seed}-lag{lag}",
        "model": model,
        "steps": steps,
        "seed": seed,
        "lag": lag,
        "group_size": group_size,
        "prompts_per_batch": prompts_per_batch,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
    }
    learner = base.get("learner", {}) | {"algo": algo, "lr": lr, "updates_per_batch": updates_per_batch}
    if device is not None:
        learner["device"] = device
    dual_flags = {"budget": var_budget, "lr": dual_lr}
    if any(v is not None for v in dual_flags.values()):
        learner["dual"] = learner.get("dual", {}) | {k: v for k, v in dual_flags.items() if v is not None}
    task_cfg = base.get("task", {}) | {"name": task}
    if task != "chain_sum" and "params" not in base.get("task", {}):
        task_cfg["params"] = {}
    try:
        cfg = SyncTrainConfig.model_validate(base | overrides | {"learner": learner, "task": task_cfg})
        from trainer.device import resolve_device
        from trainer.losses import get_loss

        get_loss(cfg.learner.algo)
        resolve_device(cfg.learner.device)  # a GPU that is not there: refused before any work
    except (ValidationError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"run directory: {cfg.run_dir}")
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        job = bar.add_task(f"{algo} lag {lag}", total=steps, info="")

        def report(done: int, total: int, record: dict) -> None:
            info = f"reward {record.get('reward_mean', 0):.2f}"
            if "lam_next" in record and algo == "r2vpo":
                info += f" λ {record['lam_next']:.3f}"
            if "accuracy" in record:
                info += f" acc {record['accuracy']:.3f}"
            bar.update(job, completed=done, info=info)

        try:
            summary = run_sync(cfg, resume=resume, progress=report)
        except (PolicyLoadError, ValueError) as exc:
            _fail(str(exc))
    console.print(
        f"held-out accuracy {summary['initial_accuracy']:.3f} → {summary['final_accuracy']:.3f} "
        f"after {summary['rollouts_consumed']} rollouts in {summary['wall_time_s']:.0f} s "
        f"(summary: {cfg.run_dir / 'summary.json'})"
    )


SERVICES = ("inference", "reward", "rollout", "learner", "dashboard")


def _load_service(name: str) -> tuple[type, object]:
    """(settings class, create_app) of a service, imported lazily so `r2vpo --help` stays fast."""
    if name == "inference":
        from services.inference import InferenceSettings, create_app
    elif name == "reward":
        from services.reward import RewardSettings as InferenceSettings
        from services.reward import create_app
    elif name == "rollout":
        from services.rollout.app import create_app
        from services.rollout.worker import RolloutSettings as InferenceSettings
    elif name == "learner":
        from services.learner.app import create_app
        from services.learner.service import LearnerSettings as InferenceSettings
    elif name == "dashboard":
        from services.dashboard import DashboardSettings as InferenceSettings
        from services.dashboard import create_app
    else:
        _fail(f"unknown service {name!r}; choose one of: {', '.join(SERVICES)}")
    return InferenceSettings, create_app


def _refusals(name: str) -> tuple[type[Exception], ...]:
    """Errors with which a service refuses to start on this machine: a message, not a traceback (exit 2)."""
    if name == "learner":
        from trainer.device import DeviceUnavailable  # learner.device names a GPU that is not there

        return (DeviceUnavailable,)
    return ()


@app.command()
def serve(
    service: str = typer.Argument(..., help="inference | reward | rollout | learner | dashboard"),
    config: Path | None = typer.Option(None, help="JSON file of the service's settings"),
    host: str | None = typer.Option(None, help="bind address [default: from settings, 127.0.0.1]"),
    port: int | None = typer.Option(None, help="port [default: from settings]"),
    model: Path | None = typer.Option(None, help="model directory (inference, learner)"),
    plugin: str | None = typer.Option(None, help="reward plug-in: builtin:<name> or module:function"),
) -> None:
    """Run one service (what compose and Kubernetes run); settings from --config JSON and R2VPO_* env."""
    import uvicorn
    from pydantic import ValidationError

    settings_cls, create_app = _load_service(service)
    values = json.loads(config.read_text()) if config else {}
    flags = {"host": host, "port": port, "model": model, "plugin": plugin}
    values |= {k: v for k, v in flags.items() if v is not None}
    try:
        settings = settings_cls(**values)
    except ValidationError as exc:
        _fail(f"invalid {service} settings:\n{exc}")
    log_level = str(getattr(settings, "log_level", "info")).lower()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        application = create_app(settings)
    except _refusals(service) as exc:
        _fail(f"the {service} cannot start: {exc}")
    uvicorn.run(
        application,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=log_level == "debug",
        timeout_graceful_shutdown=30,
    )


@app.command()
def up(
    mode: str = typer.Option("async", help="async: rollouts run ahead of the learner; sync: lock-step"),
    algo: str = typer.Option("r2vpo", help="objective: r2vpo | grpo | ppo | dapo | gspo | cispo | is"),
    steps: int = typer.Option(150, help="learner steps (16 groups × 8 samples each) before stopping"),
    rollout_workers: int = typer.Option(1, help="rollout worker processes"),
    run_dir: Path = typer.Option(Path("runs/up"), help="run directory"),
    model: Path | None = typer.Option(None, help="HF causal LM directory [default: embedded tiny policy]"),
    redis_url: str | None = typer.Option(None, help="use this Redis instead of starting one"),
    max_lag: int = typer.Option(4, help="async: how many versions rollouts may run ahead of the learner"),
    lr: float = typer.Option(1e-4, help="learning rate"),
    seed: int = typer.Option(0, help="seed"),
    config: Path | None = typer.Option(None, help="JSON file of a full UpConfig (flags override)"),
) -> None:
    """Run the whole system on this machine: Redis, inference, reward, rollout(s) and learner."""
    from pydantic import ValidationError

    from services.up import UpConfig, run_up

    base = json.loads(config.read_text()) if config else {}
    learner = base.get("learner", {}) | {"algo": algo, "lr": lr}
    try:
        cfg = UpConfig.model_validate(
            base
            | {
                "mode": mode,
                "steps": steps,
                "rollout_workers": rollout_workers,
                "run_dir": run_dir,
                "model": model,
                "redis_url": redis_url,
                "max_lag": max_lag,
                "seed": seed,
                "learner": learner,
            }
        )
    except ValidationError as exc:
        _fail(str(exc))
    with Progress(*_progress_columns(), console=console) as bar:
        job = bar.add_task(f"{algo} {mode}", total=steps, info="starting services")

        def report(event: dict) -> None:
            if event["event"] == "started":
                for name, url in event["urls"].items():
                    bar.console.print(f"  {name:<10} {url}")
            elif event["event"] == "restarted":
                bar.console.print(f"[yellow]restarted {event['service']}[/]")
            elif event["event"] == "status":
                info = f"version {event.get('version')} λ {event.get('lam', 0):.3f}"
                if event.get("accuracy") is not None:
                    info += f" acc {event['accuracy']:.3f}"
                bar.update(job, completed=event.get("step", 0), info=info)

        summary = run_up(cfg, on_progress=report)
    console.print(
        f"held-out accuracy {summary['initial_accuracy']:.3f} → {summary['final_accuracy']:.3f}; "
        f"staleness {summary['staleness_histogram']}; summary: {cfg.run_dir / 'summary.json'}"
    )


@app.command("check-reward")
def check_reward(
    url: str = typer.Argument(..., help="base URL of a reward plug-in service, e.g. http://127.0.0.1:8002"),
    timeout: float = typer.Option(10.0, help="per-request timeout in seconds"),
) -> None:
    """Run the reward plug-in contract checks against a running service."""
    from client.plugin import check_reward_main

    raise typer.Exit(check_reward_main(url, timeout=timeout))


if __name__ == "__main__":
    app()
