"""The two builds of the hot path: the compiled one is used only when it matches the sources,
the pure one whenever asked for or when it does not, and both pass the HTTP and TCP suites."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tpproxy import hotpath

REPO = Path(__file__).resolve().parents[1]
COMPILED = hotpath.BUILD.startswith("compiled")
# The suites that exercise the compiled modules: HTTP/1.1 routing and framing (with the
# differential fuzz against h11), routing rules, TCP forwarding and splice.
SUITES = [
    "tests/test_http.py",
    "tests/test_http_differential.py",
    "tests/test_framing.py",
    "tests/test_routing.py",
    "tests/test_engine.py",
    "tests/test_splice.py",
]


def builds_in(env: dict[str, str], pythonpath: Path | None = None) -> tuple[str, set[str]]:
    code = "import tpproxy.hotpath as h; print(h.BUILD); print(*set(h.loaded_builds().values()))"
    if pythonpath is not None:
        env = {**env, "PYTHONPATH": str(pythonpath)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    return out[0], set(out[1].split())


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != hotpath.PURE_ENV}


def test_pure_when_asked_even_with_a_compiled_build() -> None:
    build, kinds = builds_in({**clean_env(), hotpath.PURE_ENV: "1"})
    assert build.startswith("pure Python (TPPROXY_PURE")
    assert kinds == {"pure"}


@pytest.mark.skipif(not COMPILED, reason=f"hot path not compiled here: {hotpath.BUILD}")
def test_the_compiled_build_runs_when_it_matches_the_sources() -> None:
    build, kinds = builds_in(clean_env())
    assert build == "compiled (mypyc)"
    assert kinds == {"compiled"}


@pytest.mark.skipif(not COMPILED, reason=f"hot path not compiled here: {hotpath.BUILD}")
def test_an_edited_source_never_runs_its_stale_compiled_module(tmp_path: Path) -> None:
    copy = tmp_path / "tpproxy"
    shutil.copytree(hotpath.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    framing = copy / "http" / "framing.py"
    framing.write_text(framing.read_text() + "\nEDITED = True\n")
    build, kinds = builds_in(clean_env(), tmp_path)
    assert build.startswith("pure Python (the compiled build is older")
    assert kinds == {"pure"}


def test_without_a_build_the_sources_run(tmp_path: Path) -> None:
    copy = tmp_path / "tpproxy"
    shutil.copytree(
        hotpath.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.digest")
    )
    build, kinds = builds_in(clean_env(), tmp_path)
    assert build.startswith("pure Python (not compiled")
    assert kinds == {"pure"}


@pytest.mark.skipif(not COMPILED, reason="this run is already the pure build")
def test_the_http_and_tcp_suites_pass_on_the_pure_build() -> None:
    """This session runs the compiled build; the same suites again on the pure modules."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *SUITES],
        cwd=REPO,
        env={**clean_env(), hotpath.PURE_ENV: "1"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_no_interpreted_class_subclasses_a_compiled_one() -> None:
    """mypyc refuses interpreted subclasses of its classes (at instantiation, so a test of the
    pure build would not see it): every subclass of a hot-path class lives in the hot path."""
    import importlib
    import inspect
    import pkgutil

    import tpcontrol
    import tpproxy

    offenders = []
    for package in (tpproxy, tpcontrol):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name in hotpath.MODULES or info.name.endswith("__main__"):
                continue
            try:
                module = importlib.import_module(info.name)
            except ImportError:
                continue  # an optional extra that is not installed
            for name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ != module.__name__:
                    continue
                hot = [b.__qualname__ for b in cls.__mro__[1:] if b.__module__ in hotpath.MODULES]
                if hot:
                    offenders.append(f"{module.__name__}.{name} subclasses {hot}")
    assert offenders == []
