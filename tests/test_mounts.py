"""The agent's exports and its SFTP server, with a real SFTP client (asyncssh's) on loopback:
what the developer can read and write, and every way out of the export directory refused."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncssh
import pytest

from tpproxy.config import Container
from tpproxy.mounts import Confinement, export_container, start_server

from .helpers import run


def layout(tmp: Path) -> tuple[Container, Path, Path, Path]:
    """An agent container's files: the app's volumes under its mount point (a ConfigMap with
    kubelet's `..data` links, an emptyDir, a read-only-looking file), /var/run/secrets with
    the service-account token and the agent's own manager token, and a file outside."""
    mounts = tmp / "tel_app_mounts" / "web"
    config = mounts / "etc" / "config"
    (config / "..2026_12_02").mkdir(parents=True)
    (config / "..2026_12_02" / "greeting").write_text("hello from the ConfigMap\n")
    (config / "..data").symlink_to("..2026_12_02")
    (config / "greeting").symlink_to("..data/greeting")
    data = mounts / "data"
    data.mkdir()
    (data / "written-by-app.txt").write_text("app wrote this\n")
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "host-secret").write_text("never exported\n")
    (data / "escape").symlink_to(outside / "host-secret")
    (data / "escape-dir").symlink_to(outside)
    secrets = tmp / "secrets"
    (secrets / "kubernetes.io" / "serviceaccount").mkdir(parents=True)
    (secrets / "kubernetes.io" / "serviceaccount" / "token").write_text("sa-token")
    (secrets / "tpproxy" / "manager").mkdir(parents=True)
    (secrets / "tpproxy" / "manager" / "token").write_text("agent-credential")
    container = Container(name="web", mount_point=str(mounts), mounts=("/etc/config", "/data"))
    return container, tmp / "exports", secrets, outside


def test_export_links_the_mounts_and_the_token_but_not_the_agents_credential(
    tmp_path: Path,
) -> None:
    container, exports, secrets, _ = layout(tmp_path)
    root, mounts = export_container(container, str(exports), str(secrets))
    assert root == exports / "web"
    assert sorted(p.name for p in root.iterdir()) == ["data", "etc", "var"]
    assert (root / "etc/config/greeting").read_text() == "hello from the ConfigMap\n"
    assert (root / "var/run/secrets/kubernetes.io/serviceaccount/token").read_text() == "sa-token"
    assert not (root / "var/run/secrets/tpproxy").exists()
    assert mounts == ("/etc/config", "/data", "/var/run/secrets/kubernetes.io")
    (root / "stale").write_text("from before a restart")
    again, _ = export_container(container, str(exports), str(secrets))
    assert not (again / "stale").exists()  # made afresh


def test_confinement_resolves_before_it_allows(tmp_path: Path) -> None:
    container, exports, secrets, outside = layout(tmp_path)
    root, _ = export_container(container, str(exports), str(secrets))
    c = Confinement.of(root)
    assert c.local(b"/etc/config/greeting").endswith(b"/exports/web/etc/config/greeting")
    assert c.local(b"../../etc/config/greeting") == c.local(b"/etc/config/greeting")
    for bad in (b"/data/escape", b"/data/escape-dir/host-secret", b"data/escape-dir"):
        with pytest.raises(PermissionError, match="outside the exported files"):
            c.local(bad)
    real = os.path.realpath(root / "etc/config/greeting").encode()
    assert c.virtual(real).endswith(b"/etc/config/..2026_12_02/greeting")
    with pytest.raises(PermissionError):
        c.virtual(str(outside).encode())


@asynccontextmanager
async def sftp_to(root: Path) -> AsyncIterator[asyncssh.SFTPClient]:
    server, port = await start_server(root)
    try:
        async with asyncssh.connect(
            "127.0.0.1", port, username="developer", known_hosts=None, client_keys=None,
            password=None, agent_path=None,
        ) as conn, conn.start_sftp_client() as sftp:  # fmt: skip
            yield sftp
    finally:
        server.close()


def test_a_real_sftp_client_reads_writes_and_cannot_leave(tmp_path: Path) -> None:
    container, exports, secrets, _ = layout(tmp_path)
    root, _ = export_container(container, str(exports), str(secrets))
    big = os.urandom(8 << 20)
    (Path(container.mount_point) / "data" / "big.bin").write_bytes(big)

    async def scenario() -> None:
        async with sftp_to(root) as sftp:
            assert sorted(await sftp.listdir("/")) == [".", "..", "data", "etc", "var"]
            async with sftp.open("/etc/config/greeting") as f:
                assert await f.read() == "hello from the ConfigMap\n"
            async with sftp.open("/var/run/secrets/kubernetes.io/serviceaccount/token") as f:
                assert await f.read() == "sa-token"
            async with sftp.open("/data/big.bin", "rb") as f:
                got = await f.read()
            assert isinstance(got, bytes)
            assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
            async with sftp.open("/data/from-developer.txt", "w") as f:
                await f.write("hi app\n")
            written = Path(container.mount_point) / "data" / "from-developer.txt"
            assert written.read_text() == "hi app\n"  # the app sees it

            for path in ("/data/escape", "/data/escape-dir/host-secret"):
                with pytest.raises(asyncssh.SFTPPermissionDenied, match="outside"):
                    await sftp.open(path)
            for path in ("/../../../outside/host-secret", "../outside/host-secret",
                         "/var/run/secrets/tpproxy/manager/token", str(tmp_path / "outside")):  # fmt: skip
                with pytest.raises((asyncssh.SFTPNoSuchFile, asyncssh.SFTPPermissionDenied)):
                    await sftp.open(path)
            with pytest.raises(asyncssh.SFTPOpUnsupported):
                await sftp.symlink(str(tmp_path / "outside"), "/data/new-escape")
            with pytest.raises(asyncssh.SFTPError):
                await sftp.rename("/data/from-developer.txt", "/../../outside/moved")
            assert not (tmp_path / "outside" / "moved").exists()
            assert await sftp.realpath("/data/../etc/config") == "/etc/config"

    run(scenario())


def test_ssh_serves_nothing_but_sftp(tmp_path: Path) -> None:
    container, exports, secrets, _ = layout(tmp_path)
    root, _ = export_container(container, str(exports), str(secrets))

    async def scenario() -> None:
        server, port = await start_server(root)
        try:
            async with asyncssh.connect(
                "127.0.0.1", port, username="x", known_hosts=None, client_keys=None,
                agent_path=None,
            ) as conn:  # fmt: skip
                with pytest.raises(asyncssh.ChannelOpenError, match="Session request failed"):
                    await conn.run("cat /etc/passwd")  # no commands, no shell
                with pytest.raises(asyncssh.ChannelOpenError):  # no port forwarding
                    await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", 22)
        finally:
            server.close()

    run(scenario())


def test_without_sshfs_the_mount_is_one_line_saying_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tpcontrol.client.mount import MountUnavailable, SshfsMount
    from tpproxy.tunnel import Hello

    monkeypatch.setenv("PATH", str(tmp_path))  # no sshfs on it
    mount = SshfsMount(("127.0.0.1", 1), lambda: Hello(role="client", session="s", intercept="i"),
                       registry=tmp_path / "registry")  # fmt: skip

    async def scenario() -> None:
        with pytest.raises(
            MountUnavailable, match=r"sshfs is not installed \(.*apt-get install sshfs\)"
        ):
            await mount.start()

    run(scenario())
    assert not list(tmp_path.glob("tpcontrol-mount-*"))  # nothing made


def test_the_container_command_line_names_the_environment_but_holds_no_value() -> None:
    from tpcontrol.client.container import run_argv

    argv = run_argv(
        "/usr/bin/podman", "tpcontrol-echo-1", ["img:1", "python", "app.py"],
        {"PASSWORD": "s3cr3t", "GREETING": "hi"}, Path("/tmp/m"),
        ["/etc/config", "/var/run/secrets/kubernetes.io", "relative", "/a:b"], 8080, 80,
    )  # fmt: skip
    assert argv == [
        "/usr/bin/podman", "run", "--rm", "--name", "tpcontrol-echo-1",
        "-p", "127.0.0.1:8080:80", "-e", "GREETING", "-e", "PASSWORD",
        "-v", "/tmp/m/etc/config:/etc/config",
        "-v", "/tmp/m/var/run/secrets/kubernetes.io:/var/run/secrets/kubernetes.io",
        "img:1", "python", "app.py",
    ]  # fmt: skip
    assert not any("s3cr3t" in a for a in argv)


def test_only_containers_of_killed_clients_are_stale() -> None:
    from tpcontrol.client.container import stale

    names = ["tpcontrol-echo-http-4242", "tpcontrol-echo-http-77", "tpcontrol-7", "web",
             "tpcontrol-echo-notapid", "other-echo-4242"]  # fmt: skip
    assert stale(names, lambda pid: pid == 77) == ["tpcontrol-echo-http-4242"]
