"""Which build of the hot path runs: the mypyc-compiled modules, or the pure-Python ones.

`scripts/build_hot_path.py` (run by `./dev setup`) compiles `MODULES` with mypyc, in place, and
records a digest of their sources. The compiled modules are used only while that digest still
matches the sources (an edited module never runs stale compiled code) and `TPPROXY_PURE` is not
set; otherwise an import hook makes Python load the `.py` files, which stay the reference. The
two builds behave the same, and the test suite runs the HTTP and TCP tests over both.

Imported by `tpproxy/__init__.py` before anything else of the package; imports nothing of it.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

MODULES = (
    "tpproxy.forward",
    "tpproxy.splice",
    "tpproxy.stats",
    "tpproxy.routing",
    "tpproxy.http.framing",
    "tpproxy.http.request",
    "tpproxy.http.upstream",
    "tpproxy.http.protocol",
    "tpproxy.http.httptools_impl",
    "tpproxy.http.h11_impl",
)
GROUP = "tpproxy.hotpath_compiled"  # mypyc's shared library: tpproxy/hotpath_compiled__mypyc.*.so
PURE_ENV = "TPPROXY_PURE"
PACKAGE_DIR = Path(__file__).resolve().parent
DIGEST_FILE = PACKAGE_DIR / "hotpath.digest"


def source_path(module: str) -> Path:
    return PACKAGE_DIR.parent.joinpath(*module.split(".")).with_suffix(".py")


def sources_digest() -> str:
    """One sha256 over the compiled modules' sources, in `MODULES` order."""
    digest = hashlib.sha256()
    for module in MODULES:
        digest.update(module.encode() + b"\0" + source_path(module).read_bytes() + b"\0")
    return digest.hexdigest()


def _built_digest() -> str:
    try:
        return DIGEST_FILE.read_text().strip()
    except OSError:
        return ""


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds the hot-path modules as `.py` sources even where a compiled module sits beside."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        source = source_path(fullname)
        return importlib.util.spec_from_file_location(fullname, source) if source.exists() else None


def _choose() -> str:
    built = _built_digest()
    if os.environ.get(PURE_ENV):
        reason = f"pure Python ({PURE_ENV} is set)"
    elif not built:
        reason = "pure Python (not compiled: ./dev setup builds it with a C compiler)"
    elif built != sources_digest():
        reason = "pure Python (the compiled build is older than the sources: ./dev setup)"
    else:
        return "compiled (mypyc)"
    sys.meta_path.insert(0, _SourceFirst())
    return reason


BUILD = _choose()
"""What runs, in words: `compiled (mypyc)`, or `pure Python (why)`."""


def loaded_builds() -> dict[str, str]:
    """Each hot-path module, imported, with `compiled` or `pure` as the file it came from says."""
    found = {}
    for module in MODULES:
        file = importlib.import_module(module).__file__ or ""
        found[module] = "pure" if file.endswith(".py") else "compiled"
    return found
