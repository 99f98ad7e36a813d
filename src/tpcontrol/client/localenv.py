"""The intercepted container's environment as the developer's machine takes it.

The environment comes from the cluster (the agent reads it from the app container), so whoever
can change a workload's env, or pretend to be its agent, chooses what a developer's shell and
programs run with. Variables that change how programs are found, loaded or started (the
dynamic loader's, the shells' start-up files, interpreters' option and path variables, proxies,
PATH and HOME) are therefore withheld from the local command unless the developer names them
(`--env-allow NAME`); everything else is handed over as is. The `--env-file` is written for
`sh`'s `.`: one `NAME='value'` per line, single-quoted, so sourcing it never expands or runs
anything, and it is created readable by its owner only (it holds the app's secrets).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
WITHHELD_NAMES = frozenset(
    {
        "PATH", "HOME", "SHELL", "ENV", "BASH_ENV", "IFS", "CDPATH", "PS4", "PROMPT_COMMAND",
        "ZDOTDIR", "INPUTRC", "TMPDIR", "EDITOR", "VISUAL", "PAGER", "BROWSER",
        "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS",
        "CLASSPATH", "GCONV_PATH", "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS", "NLSPATH",
        "GIT_SSH", "GIT_SSH_COMMAND", "GIT_EXEC_PATH", "GIT_CONFIG_GLOBAL", "SSH_AUTH_SOCK",
        "KUBECONFIG", "DOCKER_HOST", "DOCKER_CONFIG", "GNUPGHOME", "XDG_CONFIG_HOME",
        "XDG_DATA_HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_DIRS", "XDG_DATA_DIRS",
        "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "FTP_PROXY",
    }
)  # fmt: skip
WITHHELD_PREFIXES = (
    "LD_", "DYLD_", "PYTHON", "PERL", "RUBY", "GEM_", "BUNDLE_", "LUA_", "NODE_", "NPM_CONFIG_",
    "BASH", "MALLOC_", "GLIBC_", "GIT_", "LESS", "GO", "PIP_", "CARGO_", "RUSTC", "RUSTDOC",
    "OPENSSL_", "SSL_", "TERMINFO", "LOC", "HIST", "MAIL", "DBUS_", "WAYLAND_", "MAKE", "CONDA",
    "VIRTUAL_ENV", "JAVA", "MAVEN", "GRADLE", "SBT_", "DOTNET_", "NUGET_", "KUBE", "DOCKER_",
    "CONTAINER", "PODMAN", "AWS_", "GOOGLE_", "AZURE_", "CLOUDSDK_", "SSH", "GPG", "GNUPG",
)  # fmt: skip
WITHHELD_SUFFIXES = ("PAGER", "ASKPASS", "_OPTS", "_OPTIONS", "FLAGS", "_PROXY", "EDITOR")
WITHHELD_PATTERN = re.compile(r"PS[0-9]|CC|CXX|CPP|LD|AR|AS|SHELLOPTS|TMOUT|DISPLAY|XAUTHORITY")


def withheld(name: str) -> bool:
    """Whether a variable of this name changes how local programs load or start."""
    upper = name.upper()
    return (
        upper in WITHHELD_NAMES
        or upper.startswith(WITHHELD_PREFIXES)
        or upper.endswith(WITHHELD_SUFFIXES)
        or WITHHELD_PATTERN.fullmatch(upper) is not None
    )


@dataclass(frozen=True)
class LocalEnvironment:
    """What is handed to the local command and written to the env file, and what is not."""

    given: dict[str, str] = field(default_factory=dict)
    withheld: list[str] = field(default_factory=list)  # loader-changing names, not asked for
    unusable: list[str] = field(default_factory=list)  # not a variable name, or a NUL inside

    def notice(self) -> str:
        """One line for the developer, or "" when nothing was held back."""
        parts = []
        if self.withheld:
            parts.append(
                "withheld from the local environment (they change how programs load; "
                f"--env-allow NAME passes one): {', '.join(self.withheld)}"
            )
        if self.unusable:
            parts.append(f"not usable as environment variables: {', '.join(self.unusable)}")
        return "; ".join(parts)


def local_environment(container: Mapping[str, str], allow: Iterable[str] = ()) -> LocalEnvironment:
    """Split the container's environment into what the developer's command gets and what not."""
    allowed = set(allow)
    given, held, unusable = {}, [], []
    for name, value in sorted(container.items()):
        if not NAME.fullmatch(name) or "\0" in value:
            unusable.append(repr(name) if not NAME.fullmatch(name) else name)
        elif withheld(name) and name not in allowed:
            held.append(name)
        else:
            given[name] = value
    return LocalEnvironment(given, held, unusable)


def shell_quote(value: str) -> str:
    """`'value'` for sh, a `'` inside written as `'\\''`: nothing in it is expanded."""
    return "'" + value.replace("'", "'\\''") + "'"


def env_file_text(env: Mapping[str, str]) -> str:
    return "".join(f"{name}={shell_quote(value)}\n" for name, value in sorted(env.items()))


class EnvFileError(OSError):
    """The env file cannot be written safely; the message says why."""


def write_env_file(path: Path, env: Mapping[str, str]) -> None:
    """The env file, created (or truncated and narrowed) to mode 0600 before anything is in it;
    only a regular file of the user's own with no other name (no symlink, hard link, FIFO or
    someone else's file in a shared folder) is ever written."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise EnvFileError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as out:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise EnvFileError(f"{path}: not a regular file")
        if found.st_uid != os.geteuid() or found.st_nlink != 1:
            raise EnvFileError(f"{path}: another user's file, or one with other names (links)")
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        out.write(env_file_text(env))
