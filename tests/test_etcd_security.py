"""etcd over TLS and with a user and password, as production runs it.

One etcd for the module serves only https, wants a client certificate signed
by the test CA (--client-cert-auth) and has authentication on: user ``mesh``
may read and write the cluster's key prefix, nothing else. A coordinator and a
node run against it, so does the client; processes given wrong settings must
stop at once with one line saying what is wrong, not a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients import Mesh
from common.clustermap import wait_settled
from common.etcd import EtcdAccess, EtcdAccessError, client_for
from common.localmesh import Child, LocalMesh, ProcessError, free_port, free_ports, tool
from coordinator.client import admin_client
from mesh.admin.v1 import admin_pb2
from meshctl.__main__ import main as meshctl
from tests.certs import make_ca, make_cert
from tests.cluster import wait_serving

CLUSTER = "secure"
PASSWORD = "mesh-secret"


@dataclass(frozen=True)
class SecureEtcd:
    """The module's etcd: its https endpoint and the files to reach it."""

    endpoint: str
    dir: Path

    def flags(self, **changes: str) -> list[str]:
        """The --etcd-* flags that work; ``changes`` replace some (empty: left out),
        e.g. ``flags(password_file=...)``."""
        settings = {"cacert": "ca.pem", "cert": "client.pem", "key": "client.key",
                    "user": "mesh", "password_file": "password"}
        settings.update(changes)
        flags: list[str] = []
        for name, value in settings.items():
            if value:
                path = value if name == "user" else str(self.dir / value)
                flags += [f"--etcd-{name.replace('_', '-')}", path]
        return flags

    @property
    def access(self) -> EtcdAccess:
        d = self.dir
        return EtcdAccess.of(self.endpoint, cacert=str(d / "ca.pem"), cert=str(d / "client.pem"),
                             key=str(d / "client.key"), user="mesh",
                             password_file=str(d / "password"))


def _etcdctl(d: Path, endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("etcdctl"), "--endpoints", endpoint, "--dial-timeout", "2s",
         "--cacert", str(d / "ca.pem"), "--cert", str(d / "client.pem"),
         "--key", str(d / "client.key"), *args],
        capture_output=True, text=True, timeout=15)


def _enable_auth(d: Path, endpoint: str) -> None:
    """root (which etcd wants before auth goes on), and ``mesh`` with readwrite on
    ``/<CLUSTER>/`` only; then authentication on."""
    for args in (["user", "add", "root:root-secret"], ["user", "grant-role", "root", "root"],
                 ["role", "add", "mesh-rw"],
                 ["role", "grant-permission", "mesh-rw", "--prefix=true", "readwrite",
                  f"/{CLUSTER}/"],
                 ["user", "add", f"mesh:{PASSWORD}"], ["user", "grant-role", "mesh", "mesh-rw"],
                 ["auth", "enable"]):
        done = _etcdctl(d, endpoint, *args)
        if done.returncode != 0:
            raise ProcessError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")


@pytest.fixture(scope="module")
def secure_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureEtcd]:
    d = tmp_path_factory.mktemp("etcd-tls")
    make_ca(d, "ca")
    make_ca(d, "other-ca")  # trusted by nobody here
    make_cert(d, "etcd", "ca")
    make_cert(d, "client", "ca")
    (d / "password").write_text(PASSWORD + "\n")
    (d / "wrong-password").write_text("guessed\n")
    port, peer_port = free_ports(2)
    client_url, peer_url = f"https://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
    child = Child("etcd", [
        tool("etcd"), "--name", "secure", "--data-dir", str(d / "data"),
        "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"secure={peer_url}",
        "--cert-file", str(d / "etcd.pem"), "--key-file", str(d / "etcd.key"),
        "--trusted-ca-file", str(d / "ca.pem"), "--client-cert-auth",
        "--heartbeat-interval", "50", "--election-timeout", "250", "--log-level", "warn",
    ], d / "etcd.log")
    child.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if not child.alive() or time.monotonic() > deadline:
                raise ProcessError(f"etcd did not start:\n{child.log_tail()}")
            time.sleep(0.05)
        _enable_auth(d, client_url)
        yield SecureEtcd(client_url, d)
    finally:
        child.stop()


async def test_mesh_runs_on_tls_etcd_with_credentials(
    secure_etcd: SecureEtcd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    local = LocalMesh(workdir=tmp_path / "mesh", cluster=CLUSTER, _owns_workdir=False)
    local.workdir.mkdir()
    local.etcd_endpoint = secure_etcd.endpoint
    flags = secure_etcd.flags()
    try:
        local.start_coordinator(["--replicas", "0", "--min-nodes", "1", *flags])
        node = local.start_node(extra=["--services", "cache", *flags])
        await wait_settled(secure_etcd.access, CLUSTER, [node.node_id], 0, timeout=30)
        await wait_serving([node.address])

        async with Mesh(etcd=secure_etcd.access, cluster=CLUSTER) as mesh:
            await mesh.cache.set("etcd-tls:k", b"v")
            assert await mesh.cache.get("etcd-tls:k") == b"v"
        # Given only endpoints, the client takes TLS and credentials from MESH_ETCD_*.
        for name, value in (("CACERT", "ca.pem"), ("CERT", "client.pem"),
                            ("KEY", "client.key"), ("PASSWORD_FILE", "password")):
            monkeypatch.setenv(f"MESH_ETCD_{name}", str(secure_etcd.dir / value))
        monkeypatch.setenv("MESH_ETCD_USER", "mesh")
        async with Mesh(etcd=secure_etcd.endpoint, cluster=CLUSTER) as mesh:
            assert await mesh.cache.get("etcd-tls:k") == b"v"

        # The coordinator found through etcd; its own etcd health check gets in too.
        async with admin_client(secure_etcd.access, CLUSTER) as admin:
            status = await admin.Status(admin_pb2.StatusRequest(), timeout=5)
        assert status.etcd.healthy, status.etcd
        # meshctl, with the same settings as flags (MESH_ETCD_* are set too, but
        # flags win).
        code = await asyncio.to_thread(meshctl, [
            "--etcd", secure_etcd.endpoint, "--cluster", CLUSTER, *flags, "topology", "--nodes"])
        assert code == 0 and node.node_id in capsys.readouterr().out
    except BaseException:
        print(f"\n===== process logs =====\n{local.logs()}")
        raise
    finally:
        local.stop()


async def test_expired_token_is_renewed(secure_etcd: SecureEtcd) -> None:
    client = client_for(secure_etcd.access)
    try:
        await client.put(f"/{CLUSTER}/probe".encode(), b"1")
        session = client._session
        assert session is not None
        # What etcd answers once it forgets a token (restart, TTL): "invalid auth token".
        session.token = "forgotten.1"
        assert (await client.get(f"/{CLUSTER}/probe".encode())).value == b"1"
        assert session.token not in ("", "forgotten.1")
        # Keys outside the role's prefix stay out of reach, with a clear error.
        with pytest.raises(EtcdAccessError, match="denied user 'mesh'"):
            await client.get(b"/elsewhere")
    finally:
        await client.close()


async def test_tls_and_credentials_with_several_endpoints(secure_etcd: SecureEtcd) -> None:
    """The first endpoint is down: the client moves to the next, with the same TLS
    settings, and authenticates there (etcd's tokens are per member)."""
    down = f"https://127.0.0.1:{free_port()}"
    access = dataclasses.replace(secure_etcd.access, endpoints=(down, secure_etcd.endpoint))
    client = client_for(access)
    try:
        assert await client.get(f"/{CLUSTER}/multi".encode()) is None  # a read is retried
        assert client.endpoint == secure_etcd.endpoint
        await client.put(f"/{CLUSTER}/multi".encode(), b"1")
        assert (await client.get(f"/{CLUSTER}/multi".encode())).value == b"1"
        with pytest.raises(EtcdAccessError, match="denied user 'mesh'"):
            await client.get(b"/elsewhere")
    finally:
        await client.close()


def _refused(secure_etcd: SecureEtcd, module: str, flags: list[str],
             endpoint: str | None = None) -> str:
    """Run ``python -m module`` against the secure etcd; it must exit non-zero at once
    with one error line and no traceback. Returns its stderr."""
    argv = [sys.executable, "-m", module, "--listen", "127.0.0.1:0", "--metrics-listen", "",
            "--etcd", endpoint or secure_etcd.endpoint, "--cluster", CLUSTER, *flags]
    if module == "nodes":
        argv += ["--services", "cache", "--node-id", "refused"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "READY" not in done.stdout
    return done.stderr


@pytest.mark.parametrize(("module", "change", "expected"), [
    ("nodes", {"password_file": "wrong-password"},
     "error: etcd refused the credentials for user 'mesh': authentication failed"),
    ("coordinator", {"user": "nobody"},
     "error: etcd refused the credentials for user 'nobody': authentication failed"),
    ("nodes", {"cacert": "other-ca.pem"}, "its TLS certificate is not trusted"),
])
def test_wrong_etcd_settings_fail_clearly(
    secure_etcd: SecureEtcd, module: str, change: dict[str, str], expected: str
) -> None:
    stderr = _refused(secure_etcd, module, secure_etcd.flags(**change))
    assert expected in stderr, stderr


def test_plaintext_to_tls_etcd_fails_clearly(secure_etcd: SecureEtcd) -> None:
    plain = secure_etcd.endpoint.removeprefix("https://")
    stderr = _refused(secure_etcd, "nodes",
                      secure_etcd.flags(cacert="", cert="", key=""), endpoint=plain)
    assert "speaks TLS, but no etcd TLS settings are given" in stderr, stderr


def test_password_flag_needs_its_file(secure_etcd: SecureEtcd) -> None:
    stderr = _refused(secure_etcd, "nodes", secure_etcd.flags(password_file=""))
    assert "--etcd-user and --etcd-password-file go together" in stderr, stderr
