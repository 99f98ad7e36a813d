"""Embedders get the engine alone: `pip install tpproxy` brings what the engine and the sidecar
need, and tpcontrol's dependencies come with the `control` extra. Checked on the metadata, and
by running the engine in a Python where the control packages cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTROL = {"kubernetes-asyncio", "cryptography", "jsonpatch", "dnslib"}
# An interpreter in which the control extra is not installed: importing one of its packages
# fails as it would in a venv made with `pip install tpproxy`.
WITHOUT_CONTROL = """
import importlib.abc, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"kubernetes_asyncio", "cryptography", "jsonpatch", "dnslib"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NotInstalled())
"""


def _names(requirements: list[str]) -> set[str]:
    return {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in requirements}


def test_the_control_packages_are_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _names(project["dependencies"]) & CONTROL == set()
    assert _names(project["optional-dependencies"]["control"]) == CONTROL


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_CONTROL + code, *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def test_every_engine_module_imports_without_the_control_extra() -> None:
    modules = sorted(
        ".".join(p.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "src" / "tpproxy").rglob("*.py")
        if p.name != "__main__.py"  # importing it runs the program
    )
    assert "tpproxy.agent" in modules
    done = _python("import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
                   "print('imported', len(sys.argv) - 1)", *modules)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"imported {len(modules)}"
    # ... and the blocker works: the control side does need them.
    blocked = _python("import tpcontrol.manager.api")
    assert "kubernetes_asyncio" in blocked.stderr


def test_tpproxy_runs_and_tpcontrol_names_the_missing_extra() -> None:
    engine = _python("import sys\nfrom tpproxy.cli import main\nsys.exit(main(['--help']))")
    assert engine.returncode == 0, engine.stderr
    assert "agent" in engine.stdout
    control = _python(
        "import sys\nfrom tpcontrol.cli.main import main\nsys.exit(main(['manager', '--help']))"
    )
    assert control.returncode == 0, control.stderr  # help needs nothing more
    control = _python(
        "import sys\nfrom tpcontrol.cli.main import main\n"
        "sys.exit(main(['list', '--manager', 'http://127.0.0.1:1']))"
    )
    assert control.returncode == 2, control.stderr
    assert "pip install 'tpproxy[control]'" in control.stderr
