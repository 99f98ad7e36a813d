"""The local cluster's images, built on this machine with no registry: buildah, mmdebstrap, ctr.

The node's containerd gets every image from a docker-archive tarball (`ctr images import`) and pods
use `imagePullPolicy: Never`, so nothing is pulled at run time and the pods need no network.

- **base** `localhost/python-base:<hash>`: a Debian minbase rootfs with python3, python3-venv,
  ca-certificates and iptables, made by mmdebstrap from the host's own apt sources, so it needs
  nothing the host's apt cannot reach. It stands in for `python:3.11-slim-bookworm`.
- **wheelhouse**: the product's dependencies as wheels, made by the host's pip (which reaches
  PyPI through its own configuration), mounted read-only into builds whose `RUN` has no network.
- **product** `localhost/tpproxy:<hash>` and **examples** `localhost/tpcontrol-examples:<hash>`:
  the repository's own Containerfiles, the ones users build with `docker build`, given the local
  base and `--no-index --find-links /wheels`.
- **pause** `localhost/pause:3.4`: the static binary of scripts/install-k8s-testbin.sh.

Every tag is a content hash of what goes into the image, so an unchanged tree rebuilds nothing
(and touches neither buildah nor the network), and any change gives a new tag that a running
containerd cannot confuse with the old one. The cache (default ~/.cache/tpcontrol/images, or
TPCONTROL_IMAGE_CACHE) holds the base rootfs, the wheelhouses and one archive per image; it is
written under a lock and through temporary names, so concurrent builds cannot corrupt it.

Long on purpose: building three images without a registry (base, wheelhouse, buildah, cache,
import) is one pipeline.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tpcontrol.localcluster.controlplane import testbin
from tpcontrol.localcluster.hostshare import flocked

# Part of every hash: bump it when this module changes what it puts into an image.
RECIPE = "1"

BASE_NAME = "localhost/python-base"
PRODUCT_NAME = "localhost/tpproxy"
EXAMPLES_NAME = "localhost/tpcontrol-examples"
PAUSE_REF = "localhost/pause:3.4"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "iptables")
PIP_OPTIONS = "--no-index --find-links /wheels"

# What each build context holds, relative to its root; the content hash covers exactly these.
PRODUCT_CONTEXT = (
    "Containerfile",
    ".containerignore",
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "src",
)
PRODUCT_REQUIRED = ("Containerfile", "pyproject.toml", "README.md", "src")
EXAMPLES_CONTEXT = ("Containerfile", "http_echo.py", "tcp_echo.py", "grpc_echo.py")
SKIPPED_DIRS = ("__pycache__",)
# The compiled hot path is the host's build (its Python, its compiler): the image runs the pure
# modules, and a rebuilt `.so` must not change the image's content hash.
SKIPPED_SUFFIXES = (".pyc", ".egg-info", ".so", "hotpath.digest")

# Older artefacts of each kind that are kept (by mtime) besides the current one; the rest are
# removed, or every source change would leave another 100 MB in the cache and buildah's store.
KEEP = 2

# Timeouts, in seconds; generous because the machine may be busy with other builds.
T_QUICK = 60
T_ROOTFS = 900
T_WHEELS = 900
T_BUILD = 900
T_PUSH = 300
T_LOCK = 3600

TOOLS = {"buildah": "buildah", "mmdebstrap": "mmdebstrap"}


@dataclass(frozen=True)
class Image:
    """One image as the node gets it: the archive to import and the name pods use."""

    ref: str
    archive: Path
    size: int


@dataclass(frozen=True)
class Images:
    """Everything a local cluster runs: the agent/manager, the demo's apps, the pod sandbox."""

    product: Image
    examples: Image
    pause: Image


class ImageBuildError(RuntimeError):
    """An image could not be built; the message names the step and ends with its output."""


def missing_tools() -> list[str]:
    """What `build_images` needs and cannot find, with where to get it (empty when ready)."""
    missing = [
        f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items() if not shutil.which(tool)
    ]
    if importlib.util.find_spec("pip") is None:
        missing.append(f"pip for {sys.executable} (python3 -m ensurepip)")
    pause = testbin() / "pause"
    if not pause.is_file():
        missing.append(f"{pause} (scripts/install-k8s-testbin.sh)")
    return missing


def default_cache() -> Path:
    """TPCONTROL_IMAGE_CACHE lets CI or a second checkout keep its images elsewhere."""
    return Path(os.environ.get("TPCONTROL_IMAGE_CACHE") or Path.home() / ".cache/tpcontrol/images")


def content_hash(root: Path, names: Iterable[str], extra: Iterable[str] = ()) -> str:
    """A hash of the named files and trees under `root` (paths, exec bits, contents) and `extra`.

    A name that does not exist counts as absent, so an optional file (LICENSE) changes the hash
    when it appears. Byte-code caches and egg-info, which builds leave in the tree, do not count.
    """
    h = hashlib.sha256(f"recipe {RECIPE}\0".encode())
    for item in extra:
        h.update(b"extra\0" + item.encode() + b"\0")
    for name in sorted(names):
        path = root / name
        if not path.exists() and not path.is_symlink():
            h.update(b"absent\0" + name.encode() + b"\0")
            continue
        for rel, file in _walk(root, name):
            _hash_file(h, rel, file)
    return h.hexdigest()[:16]


def build_images(
    source: Path, cache: Path | None = None, progress: Callable[[str], None] = print
) -> Images:
    """Build (or find in the cache) the product, examples and pause images and their archives.

    `source` is the project checkout. Needs root (buildah's default storage, mmdebstrap) and, on
    the first run only, the host's apt sources and pip index.
    """
    source = source.resolve()
    cache = (cache or default_cache()).resolve()
    for name in PRODUCT_REQUIRED:
        if not (source / name).exists():
            raise ImageBuildError(f"checkout: {source / name} is missing (not a tpproxy checkout?)")
    for name in EXAMPLES_CONTEXT:
        if not (source / "examples" / name).is_file():
            raise ImageBuildError(f"checkout: {source / 'examples' / name} is missing")
    missing = [m for m in missing_tools() if not m.startswith(str(testbin()))]
    if missing:
        raise ImageBuildError("tools: missing " + ", ".join(missing))
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _locked(cache / ".lock", progress):
        builder = _Builder(source, cache, progress)
        images = Images(
            product=builder.product(),
            examples=builder.examples(),
            pause=builder.pause(),
        )
        elapsed = time.monotonic() - started
        progress(f"images: {'ready' if builder.built else 'all cached'} ({elapsed:.2f} s)")
    return images


def import_images(
    images: Iterable[Image], containerd_socket: Path, namespace: str = "k8s.io"
) -> None:
    """Load archives into a containerd, whose CRI then runs them with `imagePullPolicy: Never`."""
    if not shutil.which("ctr"):
        raise ImageBuildError("import: ctr not found (Debian package containerd)")
    for image in images:
        _run(
            f"import {image.ref}",
            ["ctr", "-a", containerd_socket, "-n", namespace, "images", "import", image.archive],
            T_PUSH,
        )


class _Builder:
    """One `build_images` call: the hashes, and the base and wheelhouse made only when needed."""

    def __init__(self, source: Path, cache: Path, progress: Callable[[str], None]) -> None:
        self.source = source
        self.cache = cache
        self.progress = progress
        self.built = False
        self.base_argv, self.base_mirrors, self.base_hash = _base_recipe()
        self.base_ref = f"{BASE_NAME}:{self.base_hash}"
        self.requirements = _requirements(source / "pyproject.toml")
        self.wheels_hash = hashlib.sha256(
            "\0".join([RECIPE, _interpreter(), *self.requirements]).encode()
        ).hexdigest()[:16]
        self._base_ready = False
        self._wheels: Path | None = None
        for sub in ("archives", "base", "wheels", "tmp"):
            (cache / sub).mkdir(exist_ok=True)

    # --- the three images -----------------------------------------------------------------

    def product(self) -> Image:
        extra = [f"base {self.base_ref}", f"wheels {self.wheels_hash}", f"pip {PIP_OPTIONS}"]
        return self._containerfile_image(
            "product", PRODUCT_NAME, self.source, PRODUCT_CONTEXT, extra
        )

    def examples(self) -> Image:
        extra = [f"base {self.base_ref}", f"wheels {self.wheels_hash}", f"pip {PIP_OPTIONS}"]
        return self._containerfile_image(
            "examples", EXAMPLES_NAME, self.source / "examples", EXAMPLES_CONTEXT, extra
        )

    def pause(self) -> Image:
        binary = testbin() / "pause"
        if not binary.is_file():
            raise ImageBuildError(
                f"pause image: {binary} is missing (scripts/install-k8s-testbin.sh builds it)"
            )
        digest = hashlib.sha256(f"{RECIPE}\0".encode() + binary.read_bytes()).hexdigest()[:16]
        archive = self.cache / "archives" / f"pause-3.4-{digest}.docker.tar"
        if cached := self._cached(archive, f"pause image {PAUSE_REF}"):
            return cached
        t0 = time.monotonic()
        # The tag is fixed (the kubelet's --pod-infra-container-image), so a new binary moves it
        # and the image it leaves untagged is removed.
        previous = _image_info(PAUSE_REF)
        ctr = _run("pause image: buildah from", ["buildah", "from", "scratch"], T_QUICK).strip()
        try:
            _run("pause image: copy", ["buildah", "copy", ctr, binary, "/pause"], T_QUICK)
            _run(
                "pause image: config",
                ["buildah", "config", "--entrypoint", '["/pause"]', "--user", "65535:65535", ctr],
                T_QUICK,
            )
            _run("pause image: commit", ["buildah", "commit", "--rm", ctr, PAUSE_REF], T_QUICK)
        except ImageBuildError:
            _quiet(["buildah", "rm", ctr])
            raise
        current = _image_info(PAUSE_REF)
        if previous and current and previous[0] != current[0]:
            _quiet(["buildah", "rmi", previous[0]])
        image = self._export("pause image", PAUSE_REF, archive)
        self._done(f"pause image {PAUSE_REF}", t0, image)
        self._prune("pause-3.4-", archive)
        return image

    def _cached(self, archive: Path, what: str) -> Image | None:
        """The image already built into `archive`, said as such, or None."""
        found = _archived_image(archive)
        if found is not None:
            self.progress(f"{what}: cached")
        return found

    def _containerfile_image(
        self, kind: str, name: str, root: Path, context: Sequence[str], extra: list[str]
    ) -> Image:
        tag = content_hash(root, context, extra)
        ref = f"{name}:{tag}"
        prefix = name.rsplit("/", 1)[-1] + "-"
        archive = self.cache / "archives" / f"{prefix}{tag}.docker.tar"
        if cached := self._cached(archive, f"{kind} image {ref}"):
            return cached
        t0 = time.monotonic()
        ctx = Path(tempfile.mkdtemp(prefix=f"ctx-{kind}-", dir=self.cache / "tmp"))
        try:
            # The tag must name what is built: a tree being edited may have changed since it was
            # hashed, so the staged copy is hashed again and that is what is built and tagged.
            _stage(root, context, ctx)
            staged = content_hash(ctx, context, extra)
            if staged != tag:
                tag, ref = staged, f"{name}:{staged}"
                archive = self.cache / "archives" / f"{prefix}{tag}.docker.tar"
                if cached := self._cached(archive, f"{kind} image {ref}"):
                    return cached
            if _image_size(ref) is None:
                self._ensure_base()
                wheels = self._ensure_wheels()
                t0 = time.monotonic()
                _run(
                    f"{kind} image: buildah build",
                    [
                        "buildah",
                        "build",
                        "--pull=never",
                        "--network=none",
                        "--force-rm",
                        "--layers=false",
                        "-f",
                        ctx / "Containerfile",
                        "--build-arg",
                        f"BASE={self.base_ref}",
                        "--build-arg",
                        f"PIP_OPTIONS={PIP_OPTIONS}",
                        "-v",
                        f"{wheels}:/wheels:ro",
                        "-t",
                        ref,
                        ctx,
                    ],
                    T_BUILD,
                )
        finally:
            shutil.rmtree(ctx, ignore_errors=True)
        image = self._export(f"{kind} image", ref, archive)
        self._done(f"{kind} image {ref}", t0, image)
        self._prune(prefix, archive)
        return image

    # --- the inputs, made on first need ----------------------------------------------------

    def _ensure_base(self) -> None:
        if self._base_ready:
            return
        if _image_size(self.base_ref) is not None:
            self.progress(f"base image {self.base_ref}: cached")
            self._base_ready = True
            return
        t0 = time.monotonic()
        rootfs = self.cache / "base" / f"{self.base_hash}.tar"
        how = "from the cached rootfs"
        if not rootfs.is_file():
            tmp = rootfs.with_name(f".tmp-{os.getpid()}-{rootfs.name}")
            try:
                _run("base image: mmdebstrap", [*self.base_argv, tmp, *self.base_mirrors], T_ROOTFS)
                os.replace(tmp, rootfs)
            finally:
                tmp.unlink(missing_ok=True)
            how = f"rootfs {time.monotonic() - t0:.1f} s"
        t1 = time.monotonic()
        ctr = _run("base image: buildah from", ["buildah", "from", "scratch"], T_QUICK).strip()
        try:
            _run("base image: buildah add", ["buildah", "add", ctr, rootfs, "/"], T_BUILD)
            _run(
                "base image: config",
                [
                    "buildah",
                    "config",
                    "--cmd",
                    '["python3"]',
                    "--env",
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--env",
                    "LANG=C.UTF-8",
                    ctr,
                ],
                T_QUICK,
            )
            _run("base image: commit", ["buildah", "commit", "--rm", ctr, self.base_ref], T_BUILD)
        except ImageBuildError:
            _quiet(["buildah", "rm", ctr])
            raise
        size = _image_size(self.base_ref) or 0
        self.progress(
            f"base image {self.base_ref} built in {time.monotonic() - t0:.1f} s "
            f"({how}, import {time.monotonic() - t1:.1f} s), {_mb(size)}"
        )
        self.built = True
        self._base_ready = True
        self._prune_paths(self.cache / "base", rootfs, lambda p: p.suffix == ".tar")

    def _ensure_wheels(self) -> Path:
        if self._wheels is not None:
            return self._wheels
        wheels = self.cache / "wheels" / self.wheels_hash
        if wheels.is_dir():
            count = len(list(wheels.glob("*.whl")))
            self.progress(f"wheelhouse {wheels.name}: cached ({count} wheels)")
        else:
            t0 = time.monotonic()
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.wheels_hash}-", dir=wheels.parent))
            try:
                _run(
                    "wheelhouse: pip wheel",
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "wheel",
                        "--disable-pip-version-check",
                        "--no-input",
                        "--wheel-dir",
                        tmp,
                        *self.requirements,
                    ],
                    T_WHEELS,
                )
                os.replace(tmp, wheels)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            count = len(list(wheels.glob("*.whl")))
            self.progress(
                f"wheelhouse {wheels.name} built in {time.monotonic() - t0:.1f} s ({count} wheels)"
            )
            self.built = True
            self._prune_paths(wheels.parent, wheels, lambda p: p.is_dir())
        self._wheels = wheels
        return wheels

    # --- output ----------------------------------------------------------------------------

    def _export(self, step: str, ref: str, archive: Path) -> Image:
        size = _image_size(ref)
        if size is None:
            raise ImageBuildError(f"{step}: {ref} is not in buildah's storage after the build")
        image = Image(ref=ref, archive=archive, size=size)
        tmp = archive.with_name(f".tmp-{os.getpid()}-{archive.name}")
        meta = _meta_path(archive)
        tmp_meta = meta.with_name(f".tmp-{os.getpid()}-{meta.name}")
        try:
            tmp.unlink(missing_ok=True)
            _run(
                f"{step}: buildah push",
                ["buildah", "push", "--quiet", ref, f"docker-archive:{tmp}:{ref}"],
                T_PUSH,
            )
            tmp_meta.write_text(json.dumps({"ref": ref, "size": size}))
            # Metadata first: an archive without it is not trusted, so a crash between the two
            # renames costs a rebuild, never a wrong answer.
            os.replace(tmp_meta, meta)
            os.replace(tmp, archive)
        finally:
            tmp.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)
        return image

    def _done(self, what: str, t0: float, image: Image) -> None:
        self.progress(f"{what} built in {time.monotonic() - t0:.1f} s, {_mb(image.size)}")
        self.built = True

    def _prune(self, prefix: str, keep: Path) -> None:
        """Remove older archives of one image (and their buildah images) beyond KEEP."""
        archives = self.cache / "archives"
        old = sorted(
            (p for p in archives.glob(f"{prefix}*.docker.tar") if p != keep),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )[KEEP:]
        for path in old:
            meta = _meta_path(path)
            with contextlib.suppress(OSError, ValueError, KeyError):
                ref = str(json.loads(meta.read_text())["ref"])
                if ref != PAUSE_REF:
                    _quiet(["buildah", "rmi", ref])
            meta.unlink(missing_ok=True)
            path.unlink(missing_ok=True)

    def _prune_paths(self, folder: Path, keep: Path, kind: Callable[[Path], bool]) -> None:
        old = sorted(
            (p for p in folder.iterdir() if p != keep and not p.name.startswith(".") and kind(p)),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )[KEEP:]
        for path in old:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _base_recipe() -> tuple[list[str], list[str], str]:
    """mmdebstrap's command line up to SUITE, the mirrors after TARGET, and a hash of them all.

    The host's apt sources are passed as mirror files, so the rootfs comes from wherever the
    host's own apt gets its packages; their contents are part of the hash.
    """
    suite = "bookworm"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME=") and line.split("=", 1)[1].strip('"'):
                suite = line.split("=", 1)[1].strip('"')
    sources: list[Path] = []
    main = Path("/etc/apt/sources.list")
    if main.is_file() and any(
        line.strip() and not line.lstrip().startswith("#") for line in main.read_text().splitlines()
    ):
        sources.append(main)
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        sources += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--format=tar",
        "--include=" + ",".join(BASE_PACKAGES),
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        '--aptopt=Acquire::Languages "none"',
        '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
        suite,
    ]
    h = hashlib.sha256("\0".join([RECIPE, platform.machine(), *argv]).encode())
    for path in sources:
        h.update(f"\0source {path}\0".encode() + path.read_bytes())
    return argv, [str(p) for p in sources], h.hexdigest()[:16]


def _requirements(pyproject: Path) -> list[str]:
    """The wheelhouse's contents: the runtime dependencies (the control and mounts extras'
    included: the product image runs tpcontrol and serves mounts too) and the build backend.

    The build backend is there because the Containerfile builds the project from source inside
    the offline build (pip's build isolation then installs it from /wheels). The project itself
    is not built here, so the wheelhouse only changes with pyproject.toml and the source tree is
    never written to by a host-side build.
    """
    try:
        data = tomllib.loads(pyproject.read_text())
        deps = [str(d) for d in data["project"].get("dependencies", [])]
        extras = data["project"]["optional-dependencies"]
        deps += [str(d) for extra in ("control", "mounts") for d in extras.get(extra, [])]
        build = [str(d) for d in data.get("build-system", {}).get("requires", ["setuptools"])]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise ImageBuildError(f"wheelhouse: cannot read {pyproject}: {exc}") from exc
    return sorted(set(deps + build))


def _interpreter() -> str:
    """What the host's wheels are built for; the base's python must match it (see the error)."""
    libc = "-".join(platform.libc_ver())
    return f"{sys.implementation.cache_tag} {sysconfig.get_platform()} {libc}"


def _walk(root: Path, name: str) -> Iterator[tuple[str, Path]]:
    path = root / name
    if path.is_symlink() or not path.is_dir():
        yield name, path
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not _skipped(d))
        for filename in sorted(filenames):
            if not _skipped(filename):
                full = Path(dirpath) / filename
                yield full.relative_to(root).as_posix(), full


def _skipped(name: str) -> bool:
    return name in SKIPPED_DIRS or name.endswith(SKIPPED_SUFFIXES)


def _hash_file(h: hashlib._Hash, rel: str, path: Path) -> None:
    if path.is_symlink():
        h.update(b"link\0" + rel.encode() + b"\0" + os.readlink(path).encode() + b"\0")
        return
    mode = path.stat().st_mode
    data = path.read_bytes()
    executable = b"x" if mode & stat.S_IXUSR else b"-"
    h.update(b"file\0" + rel.encode() + b"\0" + executable + str(len(data)).encode() + b"\0")
    h.update(data)


def _stage(root: Path, names: Iterable[str], dest: Path) -> None:
    """Copy a build context, so that what is built is exactly what was hashed."""
    for name in names:
        path = root / name
        if not path.exists():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(
                path,
                target,
                symlinks=True,
                ignore=lambda _d, files: [f for f in files if _skipped(f)],
            )
        else:
            shutil.copy2(path, target, follow_symlinks=False)


def _meta_path(archive: Path) -> Path:
    return archive.with_name(archive.name + ".json")


def _archived_image(archive: Path) -> Image | None:
    try:
        meta = json.loads(_meta_path(archive).read_text())
        if archive.is_file():
            return Image(ref=str(meta["ref"]), archive=archive, size=int(meta["size"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _image_size(ref: str) -> int | None:
    """The image's size in buildah's storage, or None when it is not there.

    buildah reports it only rounded to three digits ("182 MB", decimal units), which is what
    `Image.size` carries: it is for people and for spotting a bloated image, not for accounting.
    """
    info = _image_info(ref)
    return info[1] if info else None


def _image_info(ref: str) -> tuple[str, int] | None:
    """(image id, size) of `ref` in buildah's storage, or None when it is not there."""
    try:
        proc = subprocess.run(
            ["buildah", "images", "--json", ref],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=T_QUICK,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    try:
        entries = json.loads(proc.stdout or "[]")
        if not entries:
            return None
        return str(entries[0]["id"]), _parse_size(str(entries[0]["size"]))
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def _parse_size(text: str) -> int:
    """buildah's human size ("182 MB", "1.23 GB", "766 KB", "512 B") in bytes."""
    number, unit = text.split()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit.upper()]
    return round(float(number) * factor)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size < 10**7 else f"{size / 1e6:.0f} MB"


@contextlib.contextmanager
def _locked(path: Path, progress: Callable[[str], None]) -> Iterator[None]:
    """One builder per cache at a time; the others wait, then find the images cached."""
    try:
        with flocked(
            path,
            T_LOCK,
            poll=0.5,
            waiting=lambda: progress(f"images: waiting for another build ({path} is locked)"),
        ):
            yield
    except TimeoutError as e:
        raise ImageBuildError(f"lock: {e}") from None


def _run(step: str, argv: Sequence[str | Path], timeout: float) -> str:
    """Run one step; its failure becomes an ImageBuildError that ends with the step's output."""
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{step}: {args[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(
            f"{step}: timed out after {timeout:.0f} s\n{_tail(exc.stdout, exc.stderr)}"
        ) from exc
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{step}: failed (exit {proc.returncode}): {' '.join(args)}\n"
            f"{_tail(proc.stdout, proc.stderr)}"
        )
    return proc.stdout


def _tail(stdout: str | bytes | None, stderr: str | bytes | None, lines: int = 25) -> str:
    def text(data: str | bytes | None) -> list[str]:
        if isinstance(data, bytes):
            data = data.decode(errors="replace")
        return (data or "").rstrip().splitlines()

    out, err = text(stdout), text(stderr)
    # buildah writes RUN's output (pip's errors) to stdout and its own verdict to stderr.
    picked = out[-(lines - min(len(err), lines // 2)) :] + err[-(lines // 2) :]
    return "\n".join(picked)


def _quiet(argv: Sequence[str]) -> None:
    """Best-effort clean-up, whose failure must not hide the error being reported."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=T_QUICK
        )
