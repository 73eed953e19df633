"""Generate Python code (+ mypy stubs) for every proto under protos/ into generated/.

Run through `make generate`. The output is not committed: `make setup` always
regenerates it, so it can never be stale.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "generated"


def _plugin(name: str) -> str | None:
    """The protoc plugin script ``name`` (mypy-protobuf's): next to this interpreter,
    as in a virtualenv that is not on PATH, else on PATH, as in pip's build
    environment, whose scripts are not next to the interpreter it runs."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    plugins = {name: _plugin(name) for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc")}
    missing = [name for name, path in plugins.items() if path is None]
    if missing:
        print(f"{', '.join(missing)} not found: install mypy-protobuf", file=sys.stderr)
        return 1
    args = [
        "protoc",
        *(f"--plugin={name}={path}" for name, path in plugins.items()),
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *files,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    # Regular packages (not namespace packages), so setuptools and mypy find them.
    for directory in [OUT / "mesh", *(p for p in (OUT / "mesh").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (OUT / "mesh" / "py.typed").touch()
    print(f"generated {len(files)} protos into {OUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
