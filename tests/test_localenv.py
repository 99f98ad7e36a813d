"""The container's environment on the developer's machine: what changes how programs load is
withheld unless named, and the env file can be sourced by a real `sh` without anything in it
being expanded or run, whatever a hostile agent or workload put in the values."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tpcontrol.client.localenv import EnvFileError, local_environment, write_env_file

HOSTILE = [
    "$(touch {marker})",
    "`touch {marker}`",
    "'; touch {marker}; '",
    '"; touch {marker}; "',
    "a\ntouch {marker}\n",
    "${{HOME:?}} $HOME \\ \\' \\n",
    "x'\\''$(touch {marker})",
    "",
    "ünïcødé ☃",
]


def test_loader_and_shell_variables_are_withheld_unless_named() -> None:
    container = {
        "GREETING": "hi",
        "LD_PRELOAD": "/tmp/evil.so",
        "DYLD_INSERT_LIBRARIES": "/tmp/evil.dylib",
        "BASH_ENV": "/tmp/evil.sh",
        "ENV": "/tmp/evil.sh",
        "PYTHONSTARTUP": "/tmp/evil.py",
        "PYTHONPATH": "/tmp",
        "NODE_OPTIONS": "--require /tmp/evil.js",
        "PERL5OPT": "-Mevil",
        "https_proxy": "http://evil:3128",
        "PATH": "/tmp/evil:/usr/bin",
        "HOME": "/tmp",
        "BASH_FUNC_ls%%": "() { evil; }",
        "DATABASE_URL": "postgres://db",
    }
    local = local_environment(container)
    assert local.given == {"DATABASE_URL": "postgres://db", "GREETING": "hi"}
    assert set(local.withheld) == set(container) - {"DATABASE_URL", "GREETING", "BASH_FUNC_ls%%"}
    assert local.unusable == ["'BASH_FUNC_ls%%'"]  # not even a variable name
    assert "--env-allow NAME" in local.notice()
    assert "LD_PRELOAD" in local.notice()

    allowed = local_environment(container, allow=["PYTHONPATH"])
    assert allowed.given["PYTHONPATH"] == "/tmp"
    assert "PYTHONPATH" not in allowed.withheld
    assert local_environment({"A": "1"}).notice() == ""


def test_a_value_with_a_nul_is_not_handed_on() -> None:
    local = local_environment({"A": "x\0y", "B": "ok"})
    assert local.given == {"B": "ok"}
    assert local.unusable == ["A"]


@pytest.mark.parametrize("template", HOSTILE)
def test_sourcing_the_env_file_runs_nothing_and_keeps_every_byte(
    tmp_path: Path, template: str
) -> None:
    marker = tmp_path / "pwned"
    value = template.format(marker=marker)
    env_file = tmp_path / "app.env"
    write_env_file(env_file, {"VALUE": value, "OTHER": "2"})
    done = subprocess.run(
        ["sh", "-c", '. "$1" && printf %s "$VALUE"', "sh", str(env_file)],
        capture_output=True, timeout=10, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == value
    assert not marker.exists()


def test_the_env_file_is_the_owners_only_even_when_it_existed(tmp_path: Path) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text("old and longer than the new content\n")
    env_file.chmod(0o644)
    write_env_file(env_file, {"A": "1"})
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert env_file.read_text() == "A='1'\n"


def test_the_env_file_does_not_follow_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    link = tmp_path / "app.env"
    link.symlink_to(target)
    with pytest.raises(EnvFileError, match="Too many levels of symbolic links"):
        write_env_file(link, {"A": "1"})
    assert target.read_text() == "precious"


def test_the_env_file_is_never_written_through_a_hard_link_or_into_a_fifo(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    link = tmp_path / "app.env"
    os.link(target, link)
    with pytest.raises(EnvFileError, match="other names"):
        write_env_file(link, {"A": "1"})
    assert target.read_text() == "precious"
    fifo = tmp_path / "fifo.env"
    os.mkfifo(fifo)
    with pytest.raises(EnvFileError):  # at once: opening a FIFO must not wait for a reader
        write_env_file(fifo, {"A": "1"})


def test_more_program_changing_variables_are_withheld() -> None:
    hostile = ["PS0", "PS1", "GIT_CONFIG_COUNT", "GIT_PAGER", "LESSOPEN", "MANPAGER", "CC",
               "MAKEFLAGS", "GOFLAGS", "PIP_INDEX_URL", "RUSTC_WRAPPER", "SSH_ASKPASS",
               "OPENSSL_CONF", "LOCPATH", "TERMINFO", "HISTFILE", "TMOUT", "BASHOPTS",
               "JAVA_OPTS", "DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "ld_preload", "Path"]  # fmt: skip
    local = local_environment(dict.fromkeys(hostile, "x") | {"APP_COLOR": "blue"})
    assert local.given == {"APP_COLOR": "blue"}
    assert sorted(local.withheld) == sorted(hostile)
