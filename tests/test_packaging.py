"""The `meshkit` distribution: build it, install it into fresh virtualenvs, run it.

The sdist and the wheel are built once, as `make dist` builds them (in this
environment rather than an isolated one). Three fresh
virtualenvs (Python alone; pip installs into them from outside, see `_venv`)
then install meshkit the three ways a user does, each build generating the
protobuf code from protos/ itself:

- `pip install <sdist>` and `pip install <wheel>`: the client alone (the base
  install), one virtualenv each;
- `pip install 'meshkit[server] @ git+file://<repo>'`: the server, from the
  repository's HEAD (CI runs on a fresh clone, so HEAD is what it tests).

Against the session's etcd, a coordinator (`meshkit-coordinator`) and a node
(`python -m meshkit.nodes`) run from the server venv, in a directory outside
the checkout; a script in each client venv sets a cache key through `from
meshkit import Mesh` and reads it back; and the installed `meshctl` keeps its
exit codes (0 ok, 2 usage, 3 unreachable: tests/test_meshctl_cli.py) and prints
JSON with `--output json`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.localmesh import Etcd, free_ports
from common.peer import generate_secret
from tests.cluster import BACKGROUND

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
    "version"]
SERVER_ONLY = ["jwt", "redis", "prometheus_client", "opentelemetry.sdk", "click", "rich",
               "grpc_health", "grpc_reflection", "uvloop"]
"""Modules of `[server]`'s dependencies: none may come with the base install."""
INSTALL_TIMEOUT = 240.0


@dataclass(frozen=True)
class Installed:
    """The built distributions and the three virtualenvs that installed them."""

    dist: Path
    client: Path
    """bin/ of the venv with the sdist, base install."""
    wheel_client: Path
    """bin/ of the venv with the wheel, base install."""
    server: Path
    """bin/ of the venv with meshkit[server] from git+file://."""
    work: Path
    """A directory outside the checkout, for the installed programs' cwd and files."""


def _env(bin_dir: Path | None = None) -> dict[str, str]:
    """This environment without anything that could put the checkout on a child's path
    or configure Mesh; with ``bin_dir`` first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MESH_") and k not in {"PYTHONPATH", "PYTHONHOME",
                                                     "VIRTUAL_ENV", "PYTHONSTARTUP"}}
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(argv: Sequence[str | Path], timeout: float, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; fail with its output unless it exits 0."""
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                            timeout=timeout, cwd=cwd, env=env or _env())
    assert result.returncode == 0, (
        f"{' '.join(map(str, argv))} exited {result.returncode}:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _venv(path: Path, requirement: str | Path) -> Path:
    """A fresh virtualenv at ``path`` with ``requirement`` pip-installed; its bin/.

    The venv gets no pip of its own: this environment's pip installs into it
    (``--python``). That saves ensurepip's seconds per venv, and Python 3.11's
    bundled pip (23.2) refuses ``name[extra] @ git+file:///path`` (a URL with no
    host) as an invalid requirement. Nothing else is in the venv: every
    dependency comes from resolving ``requirement``."""
    _run([sys.executable, "-m", "venv", "--without-pip", path], timeout=60)
    bin_dir = path / "bin"
    # cwd outside the checkout: pip must find everything through the requirement.
    # --no-compile: byte-compiling every dependency costs seconds; what runs here
    # compiles on import.
    _run([*BACKGROUND, sys.executable, "-m", "pip", "--python", bin_dir / "python",
          "install", "--quiet", "--no-compile", requirement], timeout=INSTALL_TIMEOUT, cwd=path)
    return bin_dir


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the sdist and wheel (`make dist`) while the git install runs, then install
    the sdist and the wheel."""
    work = tmp_path_factory.mktemp("packaging")
    dist = work / "dist"
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        server = pool.submit(_venv, work / "venv-git",
                             f"meshkit[server] @ git+file://{ROOT}")
        # `make dist`'s build, in this environment (make setup gives it the build
        # requirements: [dev]) rather than two more isolated ones: the git and sdist
        # installs build in pip's isolated environments, which is what proves
        # pyproject's [build-system] requirements.
        _run([*BACKGROUND, sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT],
             timeout=INSTALL_TIMEOUT)
        client = pool.submit(_venv, work / "venv-sdist", next(dist.glob("*.tar.gz")))
        wheel = pool.submit(_venv, work / "venv-wheel", next(dist.glob("*.whl")))
        return Installed(dist, client.result(), wheel.result(), server.result(), work)


def _python(bin_dir: Path, code: str, *args: str, cwd: Path) -> Any:
    """Run ``code`` with the venv's python in ``cwd``; the JSON it prints."""
    out = _run([bin_dir / "python", "-c", code, *args], timeout=60, cwd=cwd,
               env=_env(bin_dir)).stdout
    return json.loads(out)


_WHERE = """\
import importlib, importlib.util, json, os, sys
module = importlib.import_module(sys.argv[1])
print(json.dumps({"file": module.__file__, "path": [os.path.abspath(p) for p in sys.path],
                  "server_only": [m for m in sys.argv[2:]
                                  if importlib.util.find_spec(m.split(".")[0])],
                  "checkout": [m for m in ("clients", "common", "nodes", "mesh")
                               if importlib.util.find_spec(m)]}))
"""
"""Where ``argv[1]`` is imported from, the path, which of ``argv[2:]`` are importable,
and which of the checkout's own top-level names are."""


def _assert_installed(where: dict[str, Any], venv: Path) -> None:
    """The module came from ``venv``'s site-packages, and the checkout is unreachable."""
    assert Path(where["file"]).is_relative_to(venv / "lib"), where["file"]
    assert not any(Path(p).resolve().is_relative_to(ROOT) for p in where["path"]), where["path"]
    assert where["checkout"] == [], where


# --- the distributions ---------------------------------------------------------------

def test_wheel_holds_only_meshkit(installed: Installed) -> None:
    """One top-level name, py.typed, the generated code and the protos."""
    with zipfile.ZipFile(next(installed.dist.glob("*.whl"))) as wheel:
        names = wheel.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"meshkit"}
    assert "meshkit/py.typed" in names
    assert "meshkit/api/cache/v1/cache_pb2.py" in names
    assert "meshkit/protos/mesh/cache/v1/cache.proto" in names
    assert not any("node_modules" in n or n.startswith("meshkit/node/") for n in names)


def test_sdist_carries_sources_not_generated_code(installed: Installed) -> None:
    """The sdist has the protos and the build tools, and no generated code: whoever
    installs it generates the code (the client venv did)."""
    with tarfile.open(next(installed.dist.glob("*.tar.gz"))) as sdist:
        names = [n.split("/", 1)[1] for n in sdist.getnames() if "/" in n]
    for needed in ("setup.py", "pyproject.toml", "tools/generate.py",
                   "tools/rewrite_imports.py", "protos/mesh/cache/v1/cache.proto",
                   "clients/mesh.py", "nodes/__main__.py", "LICENSE"):
        assert needed in names, needed
    assert not any(n.startswith(("generated/", "clients/node/")) or n.endswith("_pb2.py")
                   for n in names)


# --- the installs --------------------------------------------------------------------

def test_client_installs_from_sdist_and_wheel(installed: Installed) -> None:
    """`from meshkit import Mesh` from the sdist's install and from the wheel's, the
    generated code with it, and no server dependency (PyJWT included) came along."""
    for client in (installed.client, installed.wheel_client):
        where = _python(client, _WHERE + "from meshkit import Mesh\n"
                        "import meshkit.api.cache.v1.cache_pb2\n",
                        "meshkit", *SERVER_ONLY, cwd=installed.work)
        _assert_installed(where, client.parent)
        assert where["server_only"] == [], (client, where["server_only"])


def test_server_install_from_git(installed: Installed) -> None:
    """`[server]` gives the three commands and `python -m meshkit.nodes`, all from the venv."""
    venv = installed.server.parent
    where = _python(installed.server, _WHERE, "meshkit.nodes", *SERVER_ONLY,
                    cwd=installed.work)
    _assert_installed(where, venv)
    assert where["server_only"] == SERVER_ONLY
    env = _env(installed.server)
    for argv in (["meshkit-node", "--help"], ["meshkit-coordinator", "--help"],
                 ["python", "-m", "meshkit.nodes", "--help"],
                 ["python", "-m", "meshkit.coordinator", "--help"]):
        helped = _run([installed.server / argv[0], *argv[1:]], timeout=60, cwd=installed.work,
                      env=env)
        assert "--cluster-secret-file" in helped.stdout, argv


def _meshctl(installed: Installed, *args: str, timeout: float = 30
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(installed.server / "meshctl"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=installed.work,
                          env=_env(installed.server))


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a failed command (and no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_installed_meshctl_exit_codes(installed: Installed) -> None:
    """The installed `meshctl`: its version, a usage error (2), etcd unreachable (3)."""
    version = _meshctl(installed, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout == f"meshctl {VERSION}\n"
    usage = _meshctl(installed, "nosuchcommand")
    assert usage.returncode == 2, usage.stderr
    _one_line_error(usage)
    nobody = _meshctl(installed, "--etcd", "127.0.0.1:1", "--timeout", "1", "status")
    assert nobody.returncode == 3, (nobody.stdout, nobody.stderr)
    assert "check --etcd" in _one_line_error(nobody)


# --- the installs against a live mesh ------------------------------------------------

_ROUND_TRIP = """\
import asyncio, json, os, sys
import meshkit
from meshkit import Mesh

async def main() -> None:
    async with Mesh(etcd=sys.argv[1], cluster=sys.argv[2], timeout=10) as mesh:
        version = await mesh.cache.set("packaging:greeting", sys.argv[3])
        value = await mesh.cache.get("packaging:greeting")
    print(json.dumps({"version": version, "value": value.decode() if value else None,
                      "file": meshkit.__file__,
                      "path": [os.path.abspath(p) for p in sys.path]}))

asyncio.run(main())
"""


class _Children:
    """Processes started in their own process groups, each logging to a file; `stop`
    ends every group (SIGTERM, then SIGKILL)."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.env = work, env
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, argv: Sequence[str | Path]) -> subprocess.Popen[bytes]:
        log = self.work / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(a) for a in argv], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.work, env=self.env, process_group=0)
        self.procs.append((proc, log))
        return proc

    def ready(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, Any]:
        """The JSON of the child's READY line (the mesh's programs print one)."""
        log = next(log for p, log in self.procs if p is proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"^READY (.*)$", log.read_text(errors="replace"), re.M)
            if found:
                return dict(json.loads(found.group(1)))
            assert proc.poll() is None, f"{log.stem} exited early:\n{self.logs()}"
            time.sleep(0.05)
        raise AssertionError(f"{log.stem} not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-4000:]}"
                         for _, log in self.procs)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            for proc, _ in self.procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
            for proc, _ in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)
            if all(proc.poll() is not None for proc, _ in self.procs):
                return


@pytest.fixture
def children(installed: Installed) -> Iterator[_Children]:
    running = _Children(installed.work, _env(installed.server))
    try:
        yield running
    finally:
        running.stop()


def test_installed_mesh_round_trip(installed: Installed, etcd: Etcd,
                                   children: _Children) -> None:
    """A coordinator and a node from the server venv; `meshctl -o json status` says the
    node serves; each client venv (sdist, wheel) sets a key and reads it back."""
    cluster = f"pkg{os.getpid()}"
    secret = installed.work / "cluster-secret"
    secret.touch(mode=0o600)
    secret.write_text(generate_secret() + "\n")
    common = ["--etcd", etcd.endpoint, "--cluster", cluster, "--lease-ttl", "5",
              "--cluster-secret-file", str(secret), "--metrics-listen", "127.0.0.1:0"]
    coordinator_port, node_port, peer_port = free_ports(3)
    coordinator = children.start("coordinator", [
        installed.server / "meshkit-coordinator", "--listen", f"127.0.0.1:{coordinator_port}",
        "--coordinator-id", "coord-pkg", "--replicas", "0", "--min-nodes", "1", *common])
    node = children.start("node", [
        installed.server / "python", "-m", "meshkit.nodes", "--node-id", "node-pkg",
        "--listen", f"127.0.0.1:{node_port}", "--peer-listen", f"127.0.0.1:{peer_port}",
        "--data-dir", str(installed.work / "node-pkg"), *common])
    children.ready(coordinator)
    address = children.ready(node)["address"]
    # Their working directory is outside the checkout, and nothing in their
    # environment points into it.
    for proc in (coordinator, node):
        assert Path(os.readlink(f"/proc/{proc.pid}/cwd")) == installed.work
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith(b"PYTHONPATH=") for e in environ)

    status: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while True:
        result = _meshctl(installed, "--etcd", etcd.endpoint, "--cluster", cluster,
                          "--timeout", "5", "--output", "json", "status")
        if result.returncode == 0:
            status = json.loads(result.stdout)
            break
        assert result.returncode == 1 and time.monotonic() < deadline, (
            f"{result.returncode}\n{result.stdout}\n{result.stderr}\n{children.logs()}")
        time.sleep(0.3)
    assert [(n["node_id"], n["address"], n["health"]) for n in status["nodes"]] == [
        ("node-pkg", address, "SERVING")], status
    assert status["coordinator_error"] is None, status

    for client in (installed.client, installed.wheel_client):
        greeting = f"hello from {client.parent.name}"
        reply = _python(client, _ROUND_TRIP, etcd.endpoint, cluster, greeting,
                        cwd=installed.work)
        assert reply["value"] == greeting and reply["version"] >= 1, reply
        _assert_installed({**reply, "checkout": []}, client.parent)
