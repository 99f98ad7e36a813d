"""The local cluster's images (tpcontrol.localcluster.images), built for real with buildah.

The images go into the default cache, so later runs and the local cluster reuse them: from cold
this takes about a minute (mmdebstrap about 25 s, the product about 12 s), then well under a second.
The build reads a snapshot of the checkout, not the checkout itself, so that edits made while the
tests run cannot make the "second build is a no-op" check flaky; the tags are content hashes, so the
snapshot's images are the checkout's images.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tpcontrol import __version__ as tpcontrol_version
from tpcontrol.localcluster import controlplane
from tpcontrol.localcluster import images as img
from tpproxy import __version__ as tpproxy_version

CHECKOUT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 900
PAUSE_C = r"""
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
static void down(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(int argc, char **argv) {
  if (argc > 1 && !strcmp(argv[1], "-v")) { puts("pause (tests/test_images.py)"); return 0; }
  signal(SIGINT, down); signal(SIGTERM, down); signal(SIGCHLD, reap);
  for (;;) pause();
}
"""


def _unavailable(message: str) -> None:
    """Skip on a developer's machine; under CI, which installs the tools, it is a failure."""
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must provide it)")
    pytest.skip(message)


@dataclass(frozen=True)
class Built:
    images: img.Images
    lines: list[str]
    seconds: float
    again: img.Images
    again_lines: list[str]
    again_seconds: float
    mtimes: dict[str, float]
    again_mtimes: dict[str, float]


@contextlib.contextmanager
def _pause_binary(tmp: Path) -> Iterator[None]:
    """The real pause binary when scripts/install-k8s-testbin.sh has made it, else a stand-in.

    K8S_TESTBIN is changed only around the builds, so the rest of a session is not affected.
    """
    if (controlplane.testbin() / "pause").is_file():
        yield
        return
    if shutil.which("gcc") is None:
        _unavailable(f"no {controlplane.testbin() / 'pause'} and no gcc to make a stand-in")
    (tmp / "pause.c").write_text(PAUSE_C)
    subprocess.run(
        ["gcc", "-Os", "-static", "-o", str(tmp / "pause"), str(tmp / "pause.c")],
        check=True,
        timeout=120,
        capture_output=True,
    )
    old = os.environ.get("K8S_TESTBIN")
    os.environ["K8S_TESTBIN"] = str(tmp)
    try:
        yield
    finally:
        if old is None:
            del os.environ["K8S_TESTBIN"]
        else:
            os.environ["K8S_TESTBIN"] = old


def _snapshot(dest: Path) -> Path:
    for name in img.PRODUCT_CONTEXT:
        if (CHECKOUT / name).exists():
            img._stage(CHECKOUT, [name], dest)
    img._stage(CHECKOUT / "examples", img.EXAMPLES_CONTEXT, dest / "examples")
    return dest


def _mtimes(images: img.Images) -> dict[str, float]:
    return {
        i.ref: i.archive.stat().st_mtime for i in (images.product, images.examples, images.pause)
    }


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if os.geteuid() != 0:
        _unavailable("building images needs root (buildah's storage, mmdebstrap)")
    missing = [m for m in img.missing_tools() if not m.startswith(str(controlplane.testbin()))]
    if missing:
        _unavailable("missing " + ", ".join(missing))
    source = _snapshot(tmp_path_factory.mktemp("checkout"))
    with _pause_binary(tmp_path_factory.mktemp("pause")):
        lines: list[str] = []
        t0 = time.monotonic()
        images = img.build_images(source, progress=lines.append)
        seconds = time.monotonic() - t0
        mtimes = _mtimes(images)
        again_lines: list[str] = []
        t0 = time.monotonic()
        again = img.build_images(source, progress=again_lines.append)
        again_seconds = time.monotonic() - t0
    print("\n".join([*lines, f"first call {seconds:.1f} s", *again_lines]))
    return Built(images, lines, seconds, again, again_lines, again_seconds, mtimes, _mtimes(again))


def _buildah(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["buildah", *args], capture_output=True, text=True, check=False, timeout=timeout
    )


@contextlib.contextmanager
def _container(image: img.Image) -> Iterator[str]:
    """A working container made from the archive itself: what the node's containerd gets."""
    made = _buildah("from", "--pull=never", f"docker-archive:{image.archive}", timeout=300)
    assert made.returncode == 0, made.stderr
    name = made.stdout.strip().splitlines()[-1]
    try:
        yield name
    finally:
        _buildah("rm", name)


def _run_in(container: str, *argv: str) -> str:
    proc = _buildah("run", "--network=none", container, "--", *argv)
    assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def _config(container: str) -> dict[str, object]:
    proc = _buildah("inspect", "--type", "container", container)
    assert proc.returncode == 0, proc.stderr
    config: dict[str, object] = json.loads(proc.stdout)["OCIv1"]["config"]
    return config


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_images_are_built_with_content_tags_and_archives(built: Built) -> None:
    images = built.images
    for image, name in (
        (images.product, img.PRODUCT_NAME),
        (images.examples, img.EXAMPLES_NAME),
    ):
        repo, tag = image.ref.rsplit(":", 1)
        assert repo == name
        assert len(tag) == 16
        assert int(tag, 16) >= 0
    assert images.pause.ref == "localhost/pause:3.4"
    for image in (images.product, images.examples, images.pause):
        assert image.archive.is_file()
        assert image.archive.parent.parent == img.default_cache().resolve()
        assert image.size > 0
        assert image.archive.stat().st_size > image.size // 2
    assert images.examples.size < images.product.size
    assert images.pause.size < 5_000_000


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_second_build_rebuilds_nothing(built: Built) -> None:
    assert built.again == built.images
    assert built.again_mtimes == built.mtimes
    assert not [line for line in built.again_lines if " built in " in line], built.again_lines
    assert built.again_lines[-1].startswith("images: all cached")
    assert built.again_seconds < 10, built.again_lines


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_product_image_runs_both_clis_and_has_iptables(built: Built) -> None:
    with _container(built.images.product) as c:
        assert _run_in(c, "tpproxy", "--version").strip() == f"tpproxy {tpproxy_version}"
        assert _run_in(c, "tpcontrol", "--version").strip() == f"tpcontrol {tpcontrol_version}"
        assert "iptables v" in _run_in(c, "iptables", "--version")
        # The image holds the venv and not the source it was built from.
        assert _run_in(c, "sh", "-c", "test ! -e /src && test ! -e /opt/tpproxy/bin/pip && echo ok")
        assert _config(c)["Entrypoint"] == ["tpproxy"]


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_examples_image_runs_the_apps(built: Built) -> None:
    with _container(built.images.examples) as c:
        assert "--port" in _run_in(
            c, "/opt/examples/bin/python", "/examples/http_echo.py", "--help"
        )
        assert "--port" in _run_in(c, "python", "/examples/tcp_echo.py", "--help")
        _run_in(c, "/opt/examples/bin/python", "-c", "import h11")


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_pause_image_runs_pause_as_nobody(built: Built) -> None:
    with _container(built.images.pause) as c:
        config = _config(c)
    assert config["Entrypoint"] == ["/pause"]
    assert config["User"] == "65535:65535"


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_a_failing_build_names_its_step_and_output(built: Built, tmp_path: Path) -> None:
    source = _snapshot(tmp_path / "checkout")
    with (source / "Containerfile").open("a") as f:
        f.write("RUN echo marker-of-a-broken-build && false\n")
    with _pause_binary(tmp_path), pytest.raises(img.ImageBuildError) as failure:
        img.build_images(source, progress=lambda _line: None)
    message = str(failure.value)
    assert message.startswith("product image: buildah build: failed")
    assert "marker-of-a-broken-build" in message


def test_content_hash_follows_every_file_of_the_context(tmp_path: Path) -> None:
    (tmp_path / "src/pkg").mkdir(parents=True)
    (tmp_path / "Containerfile").write_text("FROM x\n")
    (tmp_path / "src/pkg/mod.py").write_text("a = 1\n")
    names = ("Containerfile", "src", "LICENSE")
    first = img.content_hash(tmp_path, names)
    assert img.content_hash(tmp_path, names) == first

    # What builds leave behind does not count.
    (tmp_path / "src/pkg/__pycache__").mkdir()
    (tmp_path / "src/pkg/__pycache__/mod.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "src/pkg.egg-info").mkdir()
    (tmp_path / "src/pkg.egg-info/PKG-INFO").write_text("x")
    # Nor does the host's compiled hot path: the image installs the pure modules.
    (tmp_path / "src/pkg/mod.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    (tmp_path / "src/pkg/hotpath.digest").write_text("0" * 64)
    assert img.content_hash(tmp_path, names) == first

    seen = {first}
    (tmp_path / "src/pkg/mod.py").write_text("a = 2\n")
    seen.add(img.content_hash(tmp_path, names))
    (tmp_path / "src/pkg/mod.py").chmod(0o755)
    seen.add(img.content_hash(tmp_path, names))
    (tmp_path / "src/pkg/new.py").write_text("")
    seen.add(img.content_hash(tmp_path, names))
    (tmp_path / "src/pkg/new.py").rename(tmp_path / "src/pkg/other.py")
    seen.add(img.content_hash(tmp_path, names))
    (tmp_path / "LICENSE").write_text("Apache-2.0\n")
    seen.add(img.content_hash(tmp_path, names))
    seen.add(img.content_hash(tmp_path, names, extra=["base localhost/python-base:1"]))
    assert len(seen) == 7

    # A file outside the named ones does not count, and staging keeps the hash.
    (tmp_path / "notes.txt").write_text("x")
    last = img.content_hash(tmp_path, names)
    img._stage(tmp_path, names, tmp_path / "staged")
    assert img.content_hash(tmp_path / "staged", names) == last
    assert not (tmp_path / "staged/src/pkg/__pycache__").exists()
    assert not list((tmp_path / "staged/src/pkg").glob("*.so"))


def test_buildah_sizes_are_parsed() -> None:
    assert img._parse_size("182 MB") == 182_000_000
    assert img._parse_size("766 KB") == 766_000
    assert img._parse_size("766 kB") == 766_000
    assert img._parse_size("1.23 GB") == 1_230_000_000
    assert img._parse_size("512 B") == 512


def test_cache_location_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TPCONTROL_IMAGE_CACHE", str(tmp_path))
    assert img.default_cache() == tmp_path
    monkeypatch.delenv("TPCONTROL_IMAGE_CACHE")
    assert img.default_cache() == Path.home() / ".cache/tpcontrol/images"


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_import_images_into_a_containerd(built: Built, tmp_path: Path) -> None:
    """A private containerd (no CRI) on a socket of its own, as the node's is, takes the archives."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        _unavailable("no containerd/ctr (Debian package containerd)")
    sock = tmp_path / "containerd.sock"
    (tmp_path / "config.toml").write_text(
        f'version = 2\nroot = "{tmp_path}/root"\nstate = "{tmp_path}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
    )
    with (tmp_path / "containerd.log").open("w") as log:
        daemon = subprocess.Popen(
            ["containerd", "--config", str(tmp_path / "config.toml")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert daemon.poll() is None, (tmp_path / "containerd.log").read_text()
            assert time.monotonic() < deadline, "containerd did not open its socket"
            time.sleep(0.1)
        images = built.images
        img.import_images([images.product, images.examples, images.pause], sock)
        listed = subprocess.run(
            ["ctr", "-a", str(sock), "-n", "k8s.io", "images", "ls", "-q"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split()
        assert {images.product.ref, images.examples.ref, images.pause.ref} <= set(listed)
        with pytest.raises(img.ImageBuildError, match="import"):
            img.import_images([images.pause], sock, namespace="no/such namespace")
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=20)
