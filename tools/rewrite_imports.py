"""Rewrite the checkout's top-level imports for the installed `meshkit` package.

In the checkout the code imports `clients`, `common`, `nodes`, `coordinator`,
`meshctl`, `gateway` and `mesh` (generated); in the distribution they all live under
`meshkit` (clients/ becomes `meshkit` itself). The build rewrites only the
statement heads `import X...` and `from X... import`, so strings, relative
imports and look-alike names (`meshctl_x`) stay as they are.
"""

from __future__ import annotations

import re

# Checkout name -> installed name.
MAPPING: dict[str, str] = {
    "clients": "meshkit",
    "common": "meshkit.common",
    "nodes": "meshkit.nodes",
    "coordinator": "meshkit.coordinator",
    "meshctl": "meshkit.meshctl",
    "gateway": "meshkit.gateway",
    # Not `meshkit.mesh`: that is clients/mesh.py (the Mesh class) once installed.
    "mesh": "meshkit.api",
}

_NAMES = "|".join(sorted(MAPPING, key=len, reverse=True))
# A statement head at the start of a (possibly indented) line; the name must end
# at `.`, whitespace or end of line so `meshctl_x` or `mesh2` never match.
_FROM = re.compile(rf"^(?P<indent>[ \t]*)from[ \t]+(?P<name>{_NAMES})(?=[.\s])", re.M)
_IMPORT = re.compile(r"^(?P<indent>[ \t]*)import[ \t]+(?P<rest>[^#\n]*)", re.M)
_ALIAS = re.compile(rf"^(?P<name>{_NAMES})(?P<tail>(\.\w+)*)(?P<as>\s+as\s+\w+)?$")


def _rewrite_import(match: re.Match[str]) -> str:
    """`import a.b as c, d`: rewrite each dotted name that starts with a mapped one.

    `import common.errors` must still bind `common` (the code then writes
    `common.errors.X`), so it becomes `import meshkit.common.errors,
    meshkit.common as common`.
    """
    parts = []
    for item in match.group("rest").split(","):
        stripped = item.strip()
        found = _ALIAS.match(stripped)
        if found is None:
            parts.append(item)
            continue
        name, tail, alias = found.group("name"), found.group("tail"), found.group("as")
        new = MAPPING[name] + tail
        if alias:
            replacement = new + alias
        elif tail:
            replacement = f"{new}, {MAPPING[name]} as {name}"
        else:
            replacement = f"{new} as {name}"
        parts.append(item.replace(stripped, replacement))
    return f"{match.group('indent')}import " + ",".join(parts)


def rewrite_source(text: str) -> str:
    """Return `text` with the mapped absolute imports pointing into `meshkit`."""
    text = _FROM.sub(lambda m: f"{m.group('indent')}from {MAPPING[m.group('name')]}", text)
    return _IMPORT.sub(_rewrite_import, text)
