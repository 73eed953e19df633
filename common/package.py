"""Where this code runs: the checkout's plain packages or the installed `meshkit`."""

from __future__ import annotations

# "" in the checkout (`nodes`, `coordinator`), "meshkit." once installed
# (`meshkit.nodes`): the build rewrites imports, not strings, so code that starts
# `python -m <package>` builds the name from here.
PREFIX = __name__.removesuffix("common.package")
