"""Build step for the `meshkit` distribution (metadata lives in pyproject.toml).

The checkout keeps its plain top-level packages (clients, common, nodes,
coordinator, meshctl, gateway and the generated `mesh`); the distribution puts them all
under `meshkit`. build_py generates the protobuf code into the build (as `meshkit.api`) and then
rewrites the absolute imports of every .py/.pyi it copied (tools/rewrite_imports.py),
the way vendoring tools rewrite vendored imports.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# Checkout folder -> installed package; clients/ is the top-level package itself.
TOP = {"clients": "meshkit", "common": "meshkit.common", "nodes": "meshkit.nodes",
       "coordinator": "meshkit.coordinator", "meshctl": "meshkit.meshctl",
       "gateway": "meshkit.gateway"}
# Never in the wheel: the Node.js example (and its node_modules).
SKIP = {"clients/node"}


def _packages() -> tuple[list[str], dict[str, str]]:
    """Every package under the mapped folders, with the folder it comes from."""
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for folder, name in TOP.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT)
            if any(relative.as_posix().startswith(skip) for skip in SKIP):
                continue
            parts = relative.parts[1:]
            package = ".".join([name, *parts])
            packages.append(package)
            package_dir[package] = relative.as_posix()
    return packages, package_dir


def _load(name: str) -> ModuleType:
    """Import tools/<name>.py without making tools/ a package."""
    spec = importlib.util.spec_from_file_location(f"_meshkit_{name}", ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class BuildPy(build_py):  # type: ignore[misc]  # setuptools ships no stubs
    """Copy the mapped packages, add the generated code, rewrite the imports."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "meshkit"
        generate = _load("generate")
        temp = (Path(self.build_lib).parent / "meshkit-generate").resolve()
        temp.mkdir(parents=True, exist_ok=True)
        # Into build/ (under the source root, as generate.py reports paths
        # relative to it): never touch the checkout's generated/.
        with tempfile.TemporaryDirectory(dir=temp) as tmp:
            generate.__dict__["OUT"] = Path(tmp)
            if generate.main() != 0:
                raise RuntimeError("protobuf code generation failed")
            # `meshkit.api`, as meshkit/mesh.py is the client's Mesh module.
            self.copy_tree(str(Path(tmp) / "mesh"), str(target / "api"))
        rewrite = _load("rewrite_imports")
        for path in [*target.rglob("*.py"), *target.rglob("*.pyi")]:
            text = path.read_text(encoding="utf-8")
            new = rewrite.rewrite_source(text)
            if new != text:
                path.write_text(new, encoding="utf-8")
        (target / "py.typed").touch()
        # The .proto files, for other languages' code generation.
        self.copy_tree(str(ROOT / "protos"), str(target / "protos"))


_PACKAGES, _PACKAGE_DIR = _packages()
setup(
    packages=_PACKAGES,
    package_dir=_PACKAGE_DIR,
    package_data={"meshkit": ["py.typed", "protos/**/*.proto"]},
    cmdclass={"build_py": BuildPy},
)
