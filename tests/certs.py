"""Test certificates made with openssl: a CA, and certificates it signs.

Every certificate names 127.0.0.1 and localhost (subjectAltName), where the
test processes listen.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from common.tls import Tls


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(cwd: Path, name: str) -> None:
    """``cwd/name.pem`` and ``cwd/name.key``: a self-signed CA, valid for a day."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
            f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=cwd)


def make_cert(cwd: Path, name: str, ca: str) -> Tls:
    """``cwd/name.pem`` and ``cwd/name.key`` (CN ``name``) signed by the CA ``ca``."""
    (cwd / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=cwd)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext",
            "-out", f"{name}.pem", cwd=cwd)
    return Tls(cwd / f"{name}.pem", cwd / f"{name}.key", cwd / f"{ca}.pem")
