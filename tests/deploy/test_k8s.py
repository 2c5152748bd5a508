"""deploy/k8s without a cluster: `kubectl kustomize` renders each overlay and kubernetes-validate checks the
render against the Kubernetes 1.32 schemas (--strict: unknown fields fail); the project's own checks
cover what a schema cannot: references between objects (ConfigMaps, Secrets and their keys, PVCs,
volumes), Service selectors and ports, probe ports, GPU quantities, resources and security contexts on
every container, and settings variables that are real fields of the service that reads them."""

from __future__ import annotations

import base64
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_helpers import K8S, env_problems, load_settings, run, serve_target, tool, url_targets

pytestmark = pytest.mark.timeout(180)

OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.32.0"
WORKLOADS = ("Deployment", "StatefulSet")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def write_secrets(base: Path) -> None:
    (base / "secrets.env").write_text(
        f"redis-password={secrets.token_hex(16)}\nadmin-token={secrets.token_hex(16)}\n"
    )


@pytest.fixture(scope="module")
def k8s_tree(tmp_path_factory) -> Path:
    """A copy of deploy/k8s with a generated secrets.env (what an operator creates before applying)."""
    tree = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("secrets.env"))
    write_secrets(tree / "base")
    return tree


@pytest.fixture(scope="module")
def renders(k8s_tree) -> dict[str, list[dict]]:
    out = {}
    for overlay in OVERLAYS:
        result = run([tool("kubectl"), "kustomize", str(k8s_tree / "overlays" / overlay)])
        assert result.returncode == 0, result.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    return {
        f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"] for d in docs if d["kind"] in WORKLOADS
    }


def containers(pod: dict) -> list[dict]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def all_containers(docs: list[dict]):
    for name, pod in pod_specs(docs).items():
        for c in containers(pod):
            yield name, pod, c


def secret_data(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    return data | secret.get("stringData", {})


def container_env(docs: list[dict], container: dict) -> dict[str, str]:
    """The container's starting environment: envFrom, then env with $(VAR) expanded as the kubelet does."""
    config_maps, secret_objs = objects(docs, "ConfigMap"), objects(docs, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= config_maps[source["configMapRef"]["name"]]["data"]
        if "secretRef" in source:
            env |= secret_data(secret_objs[source["secretRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), var["value"])
        elif ref := var.get("valueFrom", {}).get("configMapKeyRef"):
            env[var["name"]] = config_maps[ref["name"]]["data"][ref["key"]]
        elif ref := var.get("valueFrom", {}).get("secretKeyRef"):
            data = secret_data(secret_objs[ref["name"]])
            if ref["key"] in data:
                env[var["name"]] = data[ref["key"]]
    return env


def port_names_and_numbers(container: dict) -> set:
    ports = container.get("ports", [])
    return {p["containerPort"] for p in ports} | {p["name"] for p in ports if "name" in p}


# --- the tools ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(k8s_tree, overlay):
    kubectl, validate = tool("kubectl"), tool("kubernetes-validate")
    script = (
        f"set -o pipefail; '{kubectl}' kustomize '{k8s_tree / 'overlays' / overlay}' "
        f"| '{validate}' --strict --quiet -k {K8S_VERSION} -"
    )
    result = run(["bash", "-c", script], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_validator_rejects_a_misspelled_field(renders, tmp_path):
    """kubernetes-validate --strict works here (a typo fails), so the green runs above mean something."""
    broken = tmp_path / "broken.yaml"
    text = yaml.safe_dump_all(renders["cpu"]).replace("readinessProbe:", "readynessProbe:", 1)
    broken.write_text(text)
    result = run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSION, str(broken)])
    assert result.returncode != 0 and "readynessProbe" in result.stdout + result.stderr


def test_render_refuses_without_a_secrets_file(k8s_tree, tmp_path):
    """Placeholder credentials can never be applied: without base/secrets.env there is no render."""
    tree = tmp_path / "k8s"
    shutil.copytree(k8s_tree, tree, ignore=shutil.ignore_patterns("secrets.env"))
    result = run([tool("kubectl"), "kustomize", str(tree / "overlays" / "cpu")])
    assert result.returncode != 0 and "secrets.env" in result.stderr


def test_secret_template_holds_placeholders_only():
    example = (K8S / "base" / "secrets.env.example").read_text()
    values = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert set(values) == {"redis-password", "admin-token"}
    assert all(v.startswith("change-me") for v in values.values())
    assert "secrets.env" in (K8S / "base" / ".gitignore").read_text().split()
    for path in K8S.rglob("*.yaml"):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert not any(d.get("kind") == "Secret" for d in docs), f"{path}: a Secret with values in git"


# --- references between objects ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_referenced_configmaps_secrets_and_keys_exist(renders, overlay):
    docs = renders[overlay]
    config_maps, secret_objs = objects(docs, "ConfigMap"), objects(docs, "Secret")
    for name, pod, c in all_containers(docs):
        for source in c.get("envFrom", []):
            for kind, found in (("configMapRef", config_maps), ("secretRef", secret_objs)):
                if kind in source and not source[kind].get("optional"):
                    assert source[kind]["name"] in found, f"{name}/{c['name']}: no {source[kind]['name']}"
        for var in c.get("env", []):
            for kind, found, data in (
                ("configMapKeyRef", config_maps, lambda o: o.get("data", {})),
                ("secretKeyRef", secret_objs, secret_data),
            ):
                ref = var.get("valueFrom", {}).get(kind)
                if ref and not ref.get("optional"):
                    assert ref["name"] in found, f"{name}/{c['name']} {var['name']}: no {ref['name']}"
                    assert ref["key"] in data(found[ref["name"]]), (
                        f"{name} {var['name']}: no key {ref['key']}"
                    )
        for volume in pod["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{name}: volume {volume['name']}"
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secret_objs, f"{name}: volume {volume['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_volumes_and_claims_exist(renders, overlay):
    docs = renders[overlay]
    claims = objects(docs, "PersistentVolumeClaim")
    for workload in (d for d in docs if d["kind"] in WORKLOADS):
        pod = workload["spec"]["template"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, (
                    f"{workload['metadata']['name']}: {v}"
                )
        for c in containers(pod):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates, (
                    f"{workload['metadata']['name']}/{c['name']}: no volume {mount['name']}"
                )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_pod_labels_and_ports_exist(renders, overlay):
    docs = renders[overlay]
    pods = pod_specs(docs)
    for workload in (d for d in docs if d["kind"] in WORKLOADS):
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{workload['metadata']['name']}: selector {selector}"
    for name, service in objects(docs, "Service").items():
        selector = service["spec"]["selector"]
        matched = [p for p in pods.values() if selector.items() <= p["metadata"]["labels"].items()]
        assert matched, f"Service {name}: selector {selector} matches no pod template"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for pod in matched:
                offered = set().union(*(port_names_and_numbers(c) for c in pod["spec"]["containers"]))
                assert target in offered, f"Service {name}: targetPort {target} not on the pods ({offered})"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_ports_the_container_has(renders, overlay):
    for name, _, c in all_containers(renders[overlay]):
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.get(probe_name)
            if not probe:
                continue
            for kind in ("httpGet", "tcpSocket", "grpc"):
                if kind in probe:
                    assert probe[kind]["port"] in port_names_and_numbers(c), (
                        f"{name}/{c['name']} {probe_name}"
                    )
        if serve_target(c.get("command")):
            assert {"livenessProbe", "readinessProbe"} <= set(c), f"{name}/{c['name']}: probes"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_statefulset_has_its_headless_service(renders):
    for overlay in OVERLAYS:
        services = objects(renders[overlay], "Service")
        for name, sts in objects(renders[overlay], "StatefulSet").items():
            governing = services.get(sts["spec"]["serviceName"])
            assert governing is not None and governing["spec"].get("clusterIP") == "None", name
            assert sts["spec"]["volumeClaimTemplates"], f"{name}: no persistent storage"


def test_hpa_scales_the_rollout_deployment_on_requested_cpu(renders):
    for overlay in OVERLAYS:
        docs = renders[overlay]
        hpas = objects(docs, "HorizontalPodAutoscaler")
        assert set(hpas) == {"rollout"}
        hpa = hpas["rollout"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = objects(docs, hpa["spec"]["scaleTargetRef"]["kind"])[hpa["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "the HPA owns the replica count"
        assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        for c in target["spec"]["template"]["spec"]["containers"]:
            assert "cpu" in c["resources"]["requests"], "CPU utilisation needs a CPU request"


def test_learner_is_a_single_recreated_replica_on_a_persistent_volume(renders):
    for overlay in OVERLAYS:
        docs = renders[overlay]
        learner = objects(docs, "Deployment")["learner"]
        assert learner["spec"]["replicas"] == 1 and learner["spec"]["strategy"]["type"] == "Recreate"
        pod = learner["spec"]["template"]["spec"]
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        container = next(c for c in pod["containers"] if serve_target(c["command"]) == "learner")
        env = container_env(docs, container)
        persistent = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims]
        for key in ("R2VPO_LEARNER_RUN_DIR",):
            assert any(env[key].startswith(p + "/") for p in persistent), f"{key}={env[key]} is not on a PVC"
        assert env["R2VPO_LEARNER_WEIGHTS_BASE_URL"] == "http://learner:8004"


# --- containers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_resources_and_a_locked_down_security_context(renders, overlay):
    for name, pod, c in all_containers(renders[overlay]):
        where = f"{overlay} {name}/{c['name']}"
        resources = c.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: requests"
        assert {"cpu", "memory"} <= set(resources.get("limits", {})), f"{where}: limits"
        sc, pod_sc = c.get("securityContext", {}), pod["spec"].get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert pod["spec"].get("automountServiceAccountToken") is False, where
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"
        if c["image"].startswith("r2vpo"):
            assert "/cache" in mounts, f"{where}: R2VPO_CACHE_DIR=/cache must be writable"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_quantities_are_whole_and_requests_equal_limits(renders, overlay):
    for name, _, c in all_containers(renders[overlay]):
        resources = c.get("resources", {})
        for section in ("requests", "limits"):
            for key, value in resources.get(section, {}).items():
                if "gpu" in key:
                    assert re.fullmatch(r"[1-9]\d*", str(value)), f"{name}/{c['name']}: {key}={value!r}"
                    other = resources.get("limits" if section == "requests" else "requests", {})
                    assert str(other.get(key, value)) == str(value), f"{name}: GPU requests != limits"


def test_gpu_overlay_puts_vllm_inference_on_a_gpu_node(renders):
    docs = renders["gpu"]
    pod = objects(docs, "Deployment")["inference"]["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "inference")
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
    env = container_env(docs, container)
    assert env["R2VPO_INFERENCE_ENGINE"] == "vllm" and env["R2VPO_INFERENCE_DEVICE"] == "cuda"
    assert env["R2VPO_INFERENCE_MODEL"] == f"/models/{env['R2VPO_MODEL']}" and "$(" not in env["R2VPO_MODEL"]
    assert container["image"].endswith(":gpu")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/models", "/dev/shm"} <= mounts
    init = next(c for c in pod["initContainers"] if c["name"] == "prepare-model")
    assert container_env(docs, init)["R2VPO_MODEL"] == env["R2VPO_MODEL"]
    assert "/models" in {m["mountPath"] for m in init["volumeMounts"]}
    learner = objects(docs, "Deployment")["learner"]["spec"]["template"]["spec"]["containers"][0]
    assert container_env(docs, learner)["R2VPO_LEARNER_MODEL"] == env["R2VPO_INFERENCE_MODEL"]


def test_learner_trains_on_its_own_gpu_in_the_gpu_overlay_and_on_cpu_in_the_cpu_overlay(renders):
    for overlay, device in (("gpu", "cuda"), ("cpu", "cpu")):
        pod = objects(renders[overlay], "Deployment")["learner"]["spec"]["template"]["spec"]
        learner = next(c for c in pod["containers"] if c["name"] == "learner")
        assert container_env(renders[overlay], learner)["R2VPO_LEARNER_LEARNER__DEVICE"] == device
        gpus = str(learner["resources"]["limits"].get("nvidia.com/gpu"))
        on_gpu_node = bool(pod.get("nodeSelector")) and bool(pod.get("tolerations"))
        assert (gpus, on_gpu_node) == (("1", True) if device == "cuda" else ("None", False))


MODELS_CLAIM = "r2vpo-models"


def test_gpu_overlay_reads_the_model_from_the_users_read_only_claim(renders):
    """Inference and the learner (and their prepare-model checks) mount the r2vpo-models PVC read-only at
    /models; the model is the directory R2VPO_MODEL names there, never a hub id to download."""
    docs = renders["gpu"]
    claim = objects(docs, "PersistentVolumeClaim")[MODELS_CLAIM]
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] not in ("Namespace",)}
    assert namespaces == {"r2vpo"}, f"objects outside the namespace: {namespaces}"
    config = next(iter(objects(docs, "ConfigMap").values()))["data"]
    name = config["R2VPO_MODEL"]
    assert name and not name.startswith(("/", ".")) and ".." not in name.split("/")
    for workload in ("inference", "learner"):
        pod = objects(docs, "Deployment")[workload]["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in containers({"spec": pod}):
            if c["name"] not in (workload, "prepare-model"):
                continue
            mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == "/models"), None)
            assert mount is not None, f"{workload}/{c['name']}: no /models"
            assert mount.get("readOnly") is True and "subPath" not in mount, (
                f"{workload}/{c['name']}: {mount}"
            )
            source = volumes[mount["name"]]
            assert source.get("persistentVolumeClaim") == {"claimName": MODELS_CLAIM, "readOnly": True}, (
                source
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_or_container_carries_a_hub_token(renders, overlay):
    docs = renders[overlay]
    for secret in objects(docs, "Secret").values():
        assert set(secret_data(secret)) == {"redis-password", "admin-token"}
    for name, _, c in all_containers(docs):
        names = {v["name"] for v in c.get("env", [])}
        assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} & names, f"{name}/{c['name']}"


def test_models_loader_pod_validates_and_fills_the_overlays_claim(renders):
    """The optional helper pod (kubectl cp into the claim) is valid, allowed in the namespace's restricted
    Pod Security level, writes as the r2vpo user, and is not part of the overlay itself."""
    path = K8S / "overlays" / "gpu" / "models-loader.yaml"
    result = run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSION, str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    pod = yaml.safe_load(path.read_text())
    assert pod["kind"] == "Pod" and pod["metadata"]["name"] not in {
        d["metadata"]["name"] for d in renders["gpu"]
    }
    namespace = objects(renders["gpu"], "Namespace")
    assert pod["metadata"]["namespace"] in namespace
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]]
    assert claims == [MODELS_CLAIM]
    (c,) = pod["spec"]["containers"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/models"}
    assert not any(m.get("readOnly") for m in c["volumeMounts"])
    sc, pod_sc = c["securityContext"], pod["spec"]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod_sc["runAsUser"] == pod_sc["fsGroup"] == 10001
    assert re.fullmatch(r"[\w./-]+:\d+(\.\d+)*", c["image"]), f"pin the helper image: {c['image']}"


def test_cpu_overlay_needs_no_gpu(renders):
    docs = renders["cpu"]
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)
    inference = objects(docs, "Deployment")["inference"]["spec"]["template"]["spec"]["containers"][0]
    assert container_env(docs, inference)["R2VPO_INFERENCE_ENGINE"] == "torch"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_variables_are_real_settings_fields(renders, overlay):
    docs = renders[overlay]
    for name, _, c in all_containers(docs):
        env = container_env(docs, c)
        problems = env_problems(set(env))  # the shared ConfigMap carries every service's variables
        assert not problems, f"{name}/{c['name']}: " + "; ".join(problems)
        target = serve_target(c.get("command"))
        if target is not None:
            assert not [v for v in env.values() if VAR_REF.search(v)], f"{name}: unexpanded $(VAR) in {env}"
            settings = load_settings(target, env)
            assert settings.port in port_names_and_numbers(c), f"{name}: listens on {settings.port}"
            assert settings.host == "0.0.0.0", f"{name}: a pod must listen on all interfaces"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_urls_reach_a_service_port(renders, overlay):
    docs = renders[overlay]
    services = objects(docs, "Service")
    for name, _, c in all_containers(docs):
        for key, value in container_env(docs, c).items():
            for _, host, port in url_targets(value):
                assert host in services, f"{name} {key}: no Service {host!r}"
                assert port in {p["port"] for p in services[host]["spec"]["ports"]}, f"{name} {key}: {port}"


def test_tools_report_versions():
    """The versions CI ran with end up in the log (pytest -rA shows this output)."""
    for name, args in (("kubectl", ["version", "--client"]), ("kubernetes-validate", ["--version"])):
        result = subprocess.run([tool(name), *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        print(name, result.stdout.strip().splitlines()[0])


def test_pods_run_as_the_user_the_image_creates(renders):
    dockerfile = (K8S.parent / "docker" / "Dockerfile").read_text()
    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", dockerfile).group(1))
    assert f"USER {uid}:{uid}" in dockerfile
    for overlay in OVERLAYS:
        for name, pod in pod_specs(renders[overlay]).items():
            if any(c["image"].startswith("r2vpo") for c in containers(pod)):
                sc = pod["spec"]["securityContext"]
                assert sc["runAsUser"] == sc["fsGroup"] == uid, f"{name}: uid {sc['runAsUser']} != {uid}"
