"""The build's import rewrite (tools/rewrite_imports.py) on tricky lines."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytestmark = pytest.mark.fast

_PATH = pathlib.Path(__file__).resolve().parents[2] / "tools" / "rewrite_imports.py"
_spec = importlib.util.spec_from_file_location("rewrite_imports", _PATH)
assert _spec is not None and _spec.loader is not None
rewrite_imports = importlib.util.module_from_spec(_spec)
sys.modules["rewrite_imports"] = rewrite_imports
_spec.loader.exec_module(rewrite_imports)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "from mesh.cache.v1 import cache_pb2 as c",
            "from meshkit.api.cache.v1 import cache_pb2 as c",
        ),
        ("from clients import Mesh", "from meshkit import Mesh"),
        ("from clients.mesh import Mesh", "from meshkit.mesh import Mesh"),
        ("from clients.errors import MeshError", "from meshkit.errors import MeshError"),
        ("    from nodes.server import serve", "    from meshkit.nodes.server import serve"),
        ("import common.errors", "import meshkit.common.errors, meshkit.common as common"),
        ("import clients", "import meshkit as clients"),
        ("import meshctl as m", "import meshkit.meshctl as m"),
        ("import os, coordinator", "import os, meshkit.coordinator as coordinator"),
        # Must not change:
        ("from meshctl_x import y", "from meshctl_x import y"),
        ("import mesh2", "import mesh2"),
        ("from . import x", "from . import x"),
        ("from .mesh import x", "from .mesh import x"),
        ('x = "from clients import Mesh"', 'x = "from clients import Mesh"'),
        ("print('import common')", "print('import common')"),
        ("from google.protobuf import message", "from google.protobuf import message"),
    ],
)
def test_rewrite(line: str, expected: str) -> None:
    """Only statement heads naming a mapped top-level package change."""
    assert rewrite_imports.rewrite_source(line + "\n") == expected + "\n"
