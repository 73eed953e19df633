"""The protos as a product: `buf lint` is clean, and every file carries the language
options that let other languages generate code from it unchanged.

buf is the pinned npm package in tools/buf (installed by `make setup`); the
options are read from descriptors that grpc_tools' protoc builds from the
sources on disk, so these tests never see stale generated code.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
BUF_DIR = ROOT / "tools" / "buf"
BUF = BUF_DIR / "node_modules" / ".bin" / "buf"
PROTO_FILES = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
SUBPROCESS_LIMIT = 60.0  # seconds


def buf(*args: str) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():
        pytest.fail(f"{BUF.relative_to(ROOT)} is missing: run `make setup` (it installs the "
                    "pinned buf CLI from tools/buf with npm ci)")
    return subprocess.run([str(BUF), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=SUBPROCESS_LIMIT, check=False)


def test_buf_lint_is_clean() -> None:
    result = buf("lint")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), (
        f"buf lint failed:\n{result.stdout}{result.stderr}")


def test_installed_buf_is_the_pinned_one() -> None:
    lock = json.loads((BUF_DIR / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/@bufbuild/buf"]["version"]
    result = buf("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == pinned, (
        f"buf {result.stdout.strip()} is installed, tools/buf pins {pinned}: run `make setup`")


def _generate_tool() -> ModuleType:
    """tools/generate.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_generate", ROOT / "tools" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def descriptors() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Every proto under protos/, parsed from source by grpc_tools' protoc."""
    from grpc_tools import protoc

    generate = _generate_tool()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "protos.binpb"
        # The include path tools/generate.py gives protoc (the googleapis files the
        # HTTP rules import are copied into the temporary folder).
        includes = [f"-I{path}" for path in generate.include_paths(Path(tmp))]
        args = ["protoc", *includes, f"--descriptor_set_out={out}", *PROTO_FILES]
        assert protoc.main(args) == 0, "protoc could not parse the protos"
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return {f.name: f for f in files}


def _pascal(word: str) -> str:
    return "".join(w[:1].upper() + w[1:] for w in word.split("_"))


def expected_options(name: str, package: str) -> dict[str, object]:
    """The options of a file of ``package``, by the conventions of buf's managed mode:
    mesh.cache.v1 -> Mesh.Cache.V1, Mesh\\Cache\\V1, Mesh::Cache::V1, MCX, cachev1."""
    parts = package.split(".")
    pascal = [_pascal(p) for p in parts]
    prefix = "".join(p[0].upper() for p in parts[:-1])  # the version excluded
    prefix += "X" * (3 - len(prefix))
    stem = Path(name).stem
    return {
        "csharp_namespace": ".".join(pascal),
        "go_package": f"github.com/mesh-dev/mesh/gen/go/{'/'.join(parts)};"
                      f"{parts[-2].replace('_', '')}{parts[-1]}",
        "java_multiple_files": True,
        "java_outer_classname": f"{_pascal(stem)}Proto",
        "java_package": f"dev.{package}",
        "objc_class_prefix": prefix,
        "php_namespace": "\\".join(pascal),
        "ruby_package": "::".join(pascal),
    }


def test_every_proto_is_found() -> None:
    assert PROTO_FILES, "no .proto file under protos/"
    assert sorted(descriptors()) == PROTO_FILES


@pytest.mark.parametrize("name", PROTO_FILES)
def test_proto_declares_language_options(name: str) -> None:
    file = descriptors()[name]
    package = file.package
    assert package.startswith("mesh.") and len(package.split(".")) == 3, package
    assert str(Path(name).parent) == package.replace(".", "/"), (
        f"{name}: package {package} does not match its directory")
    declared = {field.name: value for field, value in file.options.ListFields()}
    actual = {field: declared.get(field) for field in expected_options(name, package)}
    assert actual == expected_options(name, package), (
        f"{name} lacks or misspells language options: add them after its imports")


@pytest.mark.parametrize("name", PROTO_FILES)
def test_python_module_path_is_unchanged(name: str) -> None:
    """The Python code generated from protos/<dir>/<x>.proto is <dir>.<x>_pb2 (and
    _pb2_grpc): the language options must not move it."""
    module = name.removesuffix(".proto").replace("/", ".")
    pb2 = importlib.import_module(f"{module}_pb2")
    assert pb2.DESCRIPTOR.name == name
    importlib.import_module(f"{module}_pb2_grpc")
