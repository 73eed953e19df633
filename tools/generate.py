"""Generate Python code (+ mypy stubs) for every proto under protos/ into generated/.

Run through `make generate`. The output is not committed: `make setup` always
regenerates it, so it can never be stale.

The public protos import ``google/api/annotations.proto`` (the HTTP rules the
gateway transcodes). Those files come from the installed googleapis-common-protos
package (a dependency of grpcio-status, and a build requirement in pyproject.toml),
copied into ``generated/protos/``: protoc's include path, and the second module of
buf.yaml (buf cannot fetch buf.build/googleapis here; the copy is not linted).
Besides the code, ``generated/mesh/descriptors.binpb`` holds the protos'
descriptors with their comments, from which the gateway writes its OpenAPI document.
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
GOOGLE_API = ("annotations.proto", "http.proto")
"""The googleapis files the protos import (annotations.proto imports http.proto)."""
DESCRIPTORS = "descriptors.binpb"


def _plugin(name: str) -> str | None:
    """The protoc plugin script ``name`` (mypy-protobuf's): next to this interpreter,
    as in a virtualenv that is not on PATH, else on PATH, as in pip's build
    environment, whose scripts are not next to the interpreter it runs."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def googleapis_source() -> Path:
    """The installed googleapis-common-protos' ``google/api`` folder (its .proto files)."""
    from google.api import annotations_pb2

    return Path(annotations_pb2.__file__).parent


def vendor_googleapis(out: Path) -> Path:
    """Copy the googleapis files the protos import under ``out/protos``; returns that
    include root."""
    root = out / "protos"
    target = root / "google" / "api"
    target.mkdir(parents=True, exist_ok=True)
    source = googleapis_source()
    for name in GOOGLE_API:
        shutil.copyfile(source / name, target / name)
    return root


def include_paths(out: Path = OUT) -> list[Path]:
    """protoc's include path for protos/: the protos, the vendored googleapis files
    (copied now) and protobuf's well-known types."""
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    return [PROTOS, vendor_googleapis(out), well_known]


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    includes = include_paths(OUT)
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    plugins = {name: _plugin(name) for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc")}
    missing = [name for name, path in plugins.items() if path is None]
    if missing:
        print(f"{', '.join(missing)} not found: install mypy-protobuf", file=sys.stderr)
        return 1
    args = [
        "protoc",
        *(f"--plugin={name}={path}" for name, path in plugins.items()),
        *(f"-I{path}" for path in includes),
        f"--descriptor_set_out={OUT / DESCRIPTORS}",
        "--include_source_info",
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
    # Beside the code, so that an installed meshkit.api carries it too.
    (OUT / DESCRIPTORS).replace(OUT / "mesh" / DESCRIPTORS)
    print(f"generated {len(files)} protos into {OUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
