"""Installing the peers (haproxy, nginx, wrk, iperf3) with apt-get when missing."""

from __future__ import annotations

import os
import shutil
import subprocess

from benchmarks.sidebyside.common import (
    NGINX_STREAM_MODULE,
    SBIN_PATH,
    STREAM_PACKAGE,
    TOOLS,
    BenchError,
)


def apt_install(packages: list[str], updated: list[bool]) -> bool:
    print(f"installing with apt-get: {' '.join(packages)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if not updated[0]:
            subprocess.run(
                ["apt-get", "update"], check=True, timeout=600, env=env, stdout=subprocess.DEVNULL
            )
            updated[0] = True
        subprocess.run(
            ["apt-get", "install", "-y", *packages],
            check=True,
            timeout=900,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"  apt-get failed: {e}")
        return False
    return True


def ensure_tools(want_stream: bool) -> None:
    updated = [False]
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool, path=SBIN_PATH) is None]
    if missing and not apt_install(missing, updated):
        raise BenchError(f"could not install {missing}")
    still = [tool for tool in TOOLS if shutil.which(tool, path=SBIN_PATH) is None]
    if still:
        raise BenchError(f"still missing after apt-get install: {still}")
    if want_stream and not NGINX_STREAM_MODULE.exists():
        apt_install([STREAM_PACKAGE], updated)
