"""Compile tpproxy's hot path (`tpproxy.hotpath.MODULES`) with mypyc, in place, beside the sources.

    .venv/bin/python scripts/build_hot_path.py          # what ./dev setup runs
    .venv/bin/python scripts/build_hot_path.py --clean  # remove the compiled modules

Needs mypy (the `lint` extra brings it) and the system's C compiler with Python's headers. The
`.py` modules stay the reference: `tpproxy.hotpath` uses the compiled ones only while the digest
written here matches the sources, and never with TPPROXY_PURE set. Exit status 0 when built,
1 when it could not be (the reason is printed; the pure modules keep working).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
os.environ["TPPROXY_PURE"] = "1"  # importing tpproxy.hotpath must not depend on a build

from tpproxy import hotpath  # noqa: E402

SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify

modules, tmp = sys.argv[1].split(","), sys.argv[2]
setup(
    name="tpproxy-hotpath",
    ext_modules=mypycify(
        ["--config-file", tmp + "/mypy.ini", *modules],  # mypy's options may lead the paths
        group_name={group!r},
        opt_level="3",
        target_dir=tmp + "/c",
    ),
    script_args=["build_ext", "--inplace", "--build-temp", tmp + "/o", "--build-lib", tmp + "/lib"],
)
"""


def compiled_files() -> list[Path]:
    pkg = hotpath.PACKAGE_DIR
    return sorted(p for p in pkg.rglob("*.so") if p.is_file())


def clean() -> None:
    for path in compiled_files():
        path.unlink()
    hotpath.DIGEST_FILE.unlink(missing_ok=True)


def build() -> int:
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        print("build_hot_path: no C compiler (cc or gcc): the pure-Python hot path is used")
        return 1
    clean()
    sources = [str(hotpath.source_path(m).relative_to(SRC)) for m in hotpath.MODULES]
    with tempfile.TemporaryDirectory(prefix="tpproxy-mypyc-") as tmp:
        setup_py = Path(tmp) / "setup.py"
        setup_py.write_text(SETUP.format(group=hotpath.GROUP))
        # Only the compiled modules' own mypy settings: the project's [tool.mypy] lists files.
        config = Path(tmp) / "mypy.ini"
        config.write_text(
            "[mypy]\npython_version = 3.11\nstrict = True\n"
            "[mypy-httptools,httptools.*,re2,prometheus_client.*]\nignore_missing_imports = True\n"
        )
        result = subprocess.run(
            [sys.executable, str(setup_py), ",".join(sources), tmp],
            cwd=SRC,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if result.returncode != 0:
            clean()
            tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
            print("build_hot_path: mypyc failed; the pure-Python hot path is used:")
            print("\n".join(f"  {line}" for line in tail))
            return 1
    hotpath.DIGEST_FILE.write_text(hotpath.sources_digest() + "\n")
    print(f"build_hot_path: compiled {len(hotpath.MODULES)} modules with mypyc")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clean", action="store_true", help="remove the compiled modules")
    if parser.parse_args().clean:
        clean()
        return 0
    return build()


if __name__ == "__main__":
    sys.exit(main())
