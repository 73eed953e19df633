"""constraints.txt pins what `make setup` installs: every dependency pyproject.toml
names is pinned there, at a version pyproject.toml allows, and this environment
(which `make setup` built) has exactly that version."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, Version]:
    """Package name -> pinned version, from constraints.txt."""
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def _declared() -> list[Requirement]:
    """Every requirement of the project and of each of its extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    return [Requirement(line) for line in dict.fromkeys(lines)]


def test_every_dependency_is_pinned_at_a_version_pyproject_allows() -> None:
    pins = _pins()
    problems = []
    for requirement in _declared():
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement.name} is not pinned")
        elif not requirement.specifier.contains(pin, prereleases=True):
            problems.append(f"{requirement.name}=={pin} is outside {requirement.specifier}")
    assert not problems, "; ".join(problems) + " (run `make lock`)"


def test_this_environment_has_the_pinned_versions() -> None:
    pins = _pins()
    wrong = {}
    for requirement in _declared():
        name = canonicalize_name(requirement.name)
        installed = Version(metadata.version(name))
        if installed != pins[name]:
            wrong[name] = f"{installed} installed, {pins[name]} pinned"
    assert not wrong, f"{wrong} (run `make setup`)"
