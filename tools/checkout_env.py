"""Set up the checkout's virtualenv without installing the project itself.

Installed, the code lives under `meshkit` (see setup.py); the checkout keeps its
plain package names. So `make setup` installs the dependencies that
pyproject.toml lists (base plus the extras given on the command line), at the
versions constraints.txt pins (`make lock` writes it), and adds a .pth file
putting the repository root and generated/ on sys.path.

    python tools/checkout_env.py dev bench server etcd
"""

from __future__ import annotations

import site
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def requirements(extras: list[str]) -> list[str]:
    """The base dependencies and those of `extras`, from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    return list(dict.fromkeys(wanted))


def main(argv: list[str]) -> int:
    """Install the requirements into this interpreter's environment, then the .pth file."""
    # uv resolves and installs the ~100 packages in a quarter of pip's time (it is
    # itself one wheel, installed by pip); --compile-bytecode as pip does, since
    # with PYTHONDONTWRITEBYTECODE set nothing would write the .pyc files later
    # and every process a test starts would compile its imports again.
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "uv"], check=True)
    # Pinned: every checkout, CI run and benchmark gets the versions last tested
    # together (a new grpcio has changed its engine's CPU cost before).
    subprocess.run([sys.executable, "-m", "uv", "pip", "install", "--quiet",
                    "--python", sys.executable, "--compile-bytecode",
                    "--constraint", str(ROOT / "constraints.txt"), *requirements(argv)],
                   check=True)
    pth = Path(site.getsitepackages()[0]) / "mesh-checkout.pth"
    pth.write_text(f"{ROOT}\n{ROOT / 'generated'}\n", encoding="utf-8")
    # The `meshctl` command of an activated venv, as an installed project had it.
    script = Path(sys.executable).parent / "meshctl"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom meshctl.__main__ import main\n"
                      "sys.exit(main())\n", encoding="utf-8")
    script.chmod(0o755)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
