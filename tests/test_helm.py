"""The Helm chart: every ci/ scenario renders offline, passes `helm lint --strict`, and every
manifest validates strictly against the Kubernetes 1.29 and 1.33 schemas; bad values fail the
chart's own schema."""

from __future__ import annotations

import pathlib

import helm_python
import kubernetes_validate
import pytest
import yaml

CHART = pathlib.Path(__file__).resolve().parent.parent / "helm" / "reasoning-mesh"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
KUBERNETES = ["1.29.0", "1.33.0"]


def render(values: dict) -> list[dict]:
    with helm_python.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values=values, name="rm", namespace="mesh")
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def test_every_scenario_is_listed():
    assert {p.name for p in SCENARIOS} == {
        "minimal-values.yaml",
        "external-engine-values.yaml",
        "gateway-values.yaml",
        "multi-router-postgres-values.yaml",
        "tracing-values.yaml",
        "images-values.yaml",
        "secure-values.yaml",
    }


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_lints_renders_and_validates(scenario):
    values = yaml.safe_load(scenario.read_text()) or {}
    report = helm_python.lint(str(CHART), values, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + list(report.get("errors", []))
    assert not problems, problems
    docs = render(values)
    assert docs
    for version in KUBERNETES:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def deployments(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}


def env_of(deployment: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "<from secret>") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_services_probe_grpc_health_and_drain_before_the_kill():
    docs = render({})
    for name in ("rm-reasoning-mesh-router", "rm-reasoning-mesh-solver", "rm-reasoning-mesh-verifier"):
        pod = deployments(docs)[name]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert "grpc" in container["readinessProbe"] and "grpc" in container["livenessProbe"]
        assert pod["terminationGracePeriodSeconds"] > int(env_of(deployments(docs)[name])["RMESH_GRACE_SECONDS"])
        assert "resources" not in container  # unset by default


def test_each_service_runs_its_own_image_as_non_root_on_a_read_only_root():
    containers = {
        name.rsplit("-", 1)[1]: d["spec"]["template"]["spec"]["containers"][0]
        for name, d in deployments(render({})).items()
        if name.rsplit("-", 1)[1] in ("router", "solver", "verifier")
    }
    assert {s: c["image"] for s, c in containers.items()} == {
        "router": "rmesh-router:0.2.0", "solver": "rmesh-solver:0.2.0", "verifier": "rmesh-verifier:0.2.0"
    }
    pods = [d["spec"]["template"]["spec"] for n, d in deployments(render({})).items() if n.rsplit("-", 1)[1] in containers]
    for pod in pods:
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert [v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "tmp"] == ["256Mi"]
    for container in containers.values():
        assert container["args"] == ["serve"]
        security = container["securityContext"]
        assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        assert "/tmp" in [m["mountPath"] for m in container["volumeMounts"]]
    scenario = yaml.safe_load((CHART / "ci" / "images-values.yaml").read_text())
    images = {n.rsplit("-", 1)[1]: d["spec"]["template"]["spec"]["containers"][0]["image"] for n, d in deployments(render(scenario)).items()}
    assert images["solver"] == "registry.example.com/rmesh/rmesh-solver:0.2.0-embedded"
    assert images["router"] == "registry.example.com/rmesh/rmesh-router:0.2.0"


def test_solver_finds_the_engine_per_mode():
    assert env_of(deployments(render({}))["rm-reasoning-mesh-solver"])["RMESH_SGLANG_URL"] == "http://rm-reasoning-mesh-sglang:30000"
    gateway = render({"engine": {"gateway": {"enabled": True}, "sglang": {"replicas": 2}}})
    assert env_of(deployments(gateway)["rm-reasoning-mesh-solver"])["RMESH_SGLANG_URL"] == "http://rm-reasoning-mesh-gateway:30001"
    external = render({"engine": {"mode": "external", "externalUrl": "http://x:30000"}})
    assert "rm-reasoning-mesh-sglang" not in deployments(external)
    engine = deployments(render({"engine": {"sglang": {"tensorParallelSize": 4}}}))["rm-reasoning-mesh-sglang"]
    container = engine["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4 and "--tp-size=4" in container["args"]


def test_router_mounts_policies_without_a_restart_checksum():
    router = deployments(render({}))["rm-reasoning-mesh-router"]
    template = router["spec"]["template"]
    assert "annotations" not in template["metadata"]  # hot reload, not a rollout, picks up policy edits
    mounts = {m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
    assert "/etc/rmesh/tenants" in mounts
    assert env_of(router)["RMESH_TENANTS_DIR"] == "/etc/rmesh/tenants"


def test_optional_features_are_off_by_default():
    kinds = {d["kind"] for d in render({})}
    assert not kinds & {"HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "Role"}


@pytest.mark.parametrize(
    "values",
    [
        {"router": {"replicas": 2}},  # several routers need PostgreSQL for reviews
        {"router": {"autoscaling": {"enabled": True}}},
        {"reviewStore": {"postgresUrl": "mysql://x"}},
        {"engine": {"mode": "external"}},  # no URL
        {"engine": {"sglang": {"tensorParallelSize": 0}}},
        {"tracing": {"enabled": True}},  # no endpoint
        {"routerReplicas": 3},  # unknown key
        {"verifier": {"judge": "sglang"}},  # the reward model's URL is required
        {"router": {"toolCredentials": [{"tenant": "../x", "name": "t", "secret": "s", "key": "k"}]}},  # a path
        {"router": {"toolCredentials": [{"tenant": "a", "name": "t", "secret": "s"}]}},  # no key
    ],
)
def test_bad_values_fail_the_schema(values):
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


def test_tool_credentials_are_files_of_the_router_only_one_directory_per_tenant():
    values = yaml.safe_load((CHART / "ci" / "secure-values.yaml").read_text())
    docs = deployments(render(values))
    router = docs["rm-reasoning-mesh-router"]["spec"]["template"]["spec"]
    container = router["containers"][0]
    assert {e["name"]: e.get("value") for e in container["env"]}["RMESH_TOOL_SECRETS_DIR"] == "/etc/rmesh/tool-secrets"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tool-secrets")
    assert mount == {"name": "tool-secrets", "mountPath": "/etc/rmesh/tool-secrets", "readOnly": True}
    volume = next(v for v in router["volumes"] if v["name"] == "tool-secrets")
    assert volume["projected"]["sources"] == [
        {"secret": {"name": "fulfillment-tool", "items": [{"key": "token", "path": "support-desk/fulfillment"}]}}
    ]
    for name, deployment in docs.items():
        if name != "rm-reasoning-mesh-router":
            spec = deployment["spec"]["template"]["spec"]
            assert "tool-secrets" not in {v["name"] for v in spec.get("volumes", [])}
    assert "tool-secrets" not in {v["name"] for v in deployments(render({}))["rm-reasoning-mesh-router"]["spec"]["template"]["spec"]["volumes"]}


def test_tracing_values_reach_the_services():
    docs = render({"tracing": {"enabled": True, "endpoint": "http://collector:4317", "serviceNamePrefix": "mesh"}})
    env = env_of(deployments(docs)["rm-reasoning-mesh-solver"])
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317"
    assert env["RMESH_SERVICE_NAME_PREFIX"] == "mesh"


def test_by_default_a_generated_service_token_fences_the_solver_and_verifier_in():
    docs = render({})
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "rm-reasoning-mesh-service-token")
    assert len(secret["data"]["token"]) >= 48
    for name, deployment in deployments(docs).items():
        if name.endswith("sglang"):
            continue
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        token = next(e for e in container["env"] if e["name"] == "RMESH_SERVICE_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {"name": "rm-reasoning-mesh-service-token", "key": "token"}
        # Probes read the plaintext health-only port, which works with mesh TLS on as well.
        assert env_of(deployment)["RMESH_HEALTH_ADDR"] == "0.0.0.0:8081"
        assert container["readinessProbe"]["grpc"]["port"] == 8081 == container["livenessProbe"]["grpc"]["port"]
    verifier = env_of(deployments(docs)["rm-reasoning-mesh-verifier"])
    assert verifier["RMESH_PYTHON_TESTS"] == "on" and verifier["RMESH_SANDBOX_CONCURRENCY"] == "2"


def test_the_secure_scenario_uses_mutual_tls_and_a_separate_code_verifier():
    docs = render(yaml.safe_load((CHART / "ci" / "secure-values.yaml").read_text()))
    assert not [d for d in docs if d["kind"] == "Secret"]  # no token: the mesh runs on mutual TLS
    found = deployments(docs)
    for name in ("router", "solver", "verifier", "code-verifier"):
        deployment = found[f"rm-reasoning-mesh-{name}"]
        env = env_of(deployment)
        assert env["RMESH_MESH_TLS_CA"] == "/etc/rmesh/mesh-tls/ca.crt" and "RMESH_SERVICE_TOKEN" not in env
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["mesh-tls"]["secret"]["secretName"] == "rmesh-mesh-tls"
    assert env_of(found["rm-reasoning-mesh-router"])["RMESH_TLS_CERT"] == "/etc/rmesh/public-tls/tls.crt"
    for caller in ("router", "solver"):
        assert env_of(found[f"rm-reasoning-mesh-{caller}"])["RMESH_CODE_VERIFIER_ADDR"] == "dns:///rm-reasoning-mesh-code-verifier-pods:50053"
    assert env_of(found["rm-reasoning-mesh-verifier"])["RMESH_PYTHON_TESTS"] == "off"
    code = found["rm-reasoning-mesh-code-verifier"]["spec"]["template"]["spec"]
    assert env_of(found["rm-reasoning-mesh-code-verifier"])["RMESH_PYTHON_TESTS"] == "on"
    assert code["runtimeClassName"] == "gvisor" and code["securityContext"]["seccompProfile"]["type"] == "Localhost"
    assert code["containers"][0]["image"] == "rmesh-verifier:0.2.0"
    policies = {d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert "rm-reasoning-mesh-code-verifier" in policies
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert services["rm-reasoning-mesh-code-verifier"]["spec"]["ports"][0]["port"] == 50053


def test_the_engine_loads_gated_models_survives_slow_starts_and_rolls_out_without_a_spare_gpu():
    docs = render({"engine": {"sglang": {"hfTokenSecret": "hf", "modelCache": {"existingClaim": "weights"}}}})
    engine = deployments(docs)["rm-reasoning-mesh-sglang"]
    assert engine["spec"]["strategy"] == {"type": "Recreate", "rollingUpdate": None}
    pod = engine["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "lmsysorg/sglang:v0.5.23-cu130"
    token = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert {"name": "HF_HOME", "value": "/models/huggingface"} in container["env"]
    assert {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]["claimName"] == "weights"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health" and startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    # /health sleeps 1 s before answering: every probe allows more than that.
    assert all(container[p]["timeoutSeconds"] >= 5 for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert pod["automountServiceAccountToken"] is False


def test_only_the_gateway_carries_a_service_account_token():
    docs = render({"engine": {"gateway": {"enabled": True}, "sglang": {"replicas": 2}}})
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    assert accounts["rm-reasoning-mesh"]["automountServiceAccountToken"] is False
    assert "automountServiceAccountToken" not in accounts["rm-reasoning-mesh-gateway"]
    gateway = deployments(docs)["rm-reasoning-mesh-gateway"]["spec"]["template"]["spec"]
    assert gateway["serviceAccountName"] == "rm-reasoning-mesh-gateway"
    assert gateway["containers"][0]["image"] == "lmsysorg/sglang:v0.5.23-cu130"  # one SGLang version
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["subjects"][0]["name"] == "rm-reasoning-mesh-gateway"


def test_reviews_outlive_the_router_pod_and_calls_spread_over_pods():
    docs = render({})
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "rm-reasoning-mesh-reviews"
    router = deployments(docs)["rm-reasoning-mesh-router"]
    assert router["spec"]["strategy"] == {"type": "Recreate", "rollingUpdate": None}
    volumes = {v["name"]: v for v in router["spec"]["template"]["spec"]["volumes"]}
    assert volumes["reviews"]["persistentVolumeClaim"]["claimName"] == "rm-reasoning-mesh-reviews"
    env = env_of(router)
    assert env["RMESH_SOLVER_ADDR"] == "dns:///rm-reasoning-mesh-solver-pods:50052"
    assert env["RMESH_VERIFIER_ADDR"] == "dns:///rm-reasoning-mesh-verifier-pods:50053"
    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    # Headless Services beside the ClusterIP ones, whose clusterIP an upgrade could not change.
    assert services["rm-reasoning-mesh-solver-pods"]["clusterIP"] == "None" == services["rm-reasoning-mesh-verifier-pods"]["clusterIP"]
    assert not any("clusterIP" in services[f"rm-reasoning-mesh-{c}"] for c in ("router", "solver", "verifier"))
    # With PostgreSQL there is no claim and routers roll out as usual.
    scenario = yaml.safe_load((CHART / "ci" / "multi-router-postgres-values.yaml").read_text())
    docs = render(scenario)
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert "strategy" not in deployments(docs)["rm-reasoning-mesh-router"]["spec"]


def test_liveness_reads_its_own_entry_so_a_solver_waiting_for_its_engine_is_not_restarted():
    for name, deployment in deployments(render({})).items():
        if name.endswith("sglang"):
            continue
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["grpc"] == {"port": 8081, "service": "rmesh.live"}
        assert "service" not in container["readinessProbe"]["grpc"]  # readiness follows the engine


def test_the_default_engine_model_needs_no_token_and_networkpolicy_covers_the_engine():
    engine = deployments(render({}))["rm-reasoning-mesh-sglang"]["spec"]["template"]["spec"]["containers"][0]
    assert "--model-path=Qwen/Qwen2.5-0.5B-Instruct" in engine["args"]
    assert "HF_TOKEN" not in {e["name"] for e in engine["env"]}
    docs = render({"networkPolicy": {"enabled": True}, "engine": {"gateway": {"enabled": True}, "sglang": {"replicas": 2}}})
    policies = {d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert {"rm-reasoning-mesh-sglang", "rm-reasoning-mesh-gateway", "rm-reasoning-mesh-solver"} <= policies
