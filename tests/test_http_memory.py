"""A 1 GB upload and a 1 GB download through an HTTP-mode port: the agent's memory stays bounded."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .helpers import free_port, run
from .http_servers import Upstream, pattern_sha256
from .test_cli import finish, wait_for_port

GB = 1024**3
LIMIT = 64 * 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class PeakRss(threading.Thread):
    """Samples a process's RSS every 20 ms until stopped; `peak` is the largest seen."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))


async def upload(port: int, total: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: s\r\nContent-Length: %d\r\n\r\n" % total)
    block = bytes(range(256)) * 4096  # 1 MiB
    for _ in range(total // len(block)):
        writer.write(block)
        await writer.drain()
    async with asyncio.timeout(120):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
    writer.close()
    return body


async def download(port: int, total: int) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /bytes/%d HTTP/1.1\r\nHost: s\r\n\r\n" % total)
    digest = hashlib.sha256()
    got = 0
    async with asyncio.timeout(120):
        await reader.readuntil(b"\r\n\r\n")
        while got < total:
            data = await reader.read(1 << 20)
            assert data, f"closed after {got} bytes"
            digest.update(data)
            got += len(data)
    writer.close()
    return got, digest.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["httptools", "h11"])
def test_1gb_each_way_with_bounded_memory(backend: str) -> None:
    async def scenario() -> None:
        app = await Upstream("app").start()
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tpproxy",
                "run",
                "--forward",
                f"{port}=127.0.0.1:{app.port}",
                "--mode",
                "http",
                "--http-parser",
                backend,
                "--listen-host",
                "127.0.0.1",
                "--admin",
                "off",
                "--log-level",
                "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            await asyncio.to_thread(wait_for_port, port, proc)
            await download(port, 1000)  # warm: one request served
            idle = rss(proc.pid)
            sampler = PeakRss(proc.pid)
            sampler.start()
            block = hashlib.sha256()
            for _ in range(GB // (1 << 20)):
                block.update(bytes(range(256)) * 4096)
            expected = block.hexdigest()
            answer = await upload(port, GB)
            assert answer == f"app got {GB} bytes sha256={expected}".encode()
            got, sha = await download(port, GB)
            assert got == GB
            assert sha == pattern_sha256(GB)
            sampler.stopped.set()
            sampler.join()
            grown = sampler.peak - idle
            print(
                f"{backend}: idle RSS {idle / 2**20:.1f} MiB, peak {sampler.peak / 2**20:.1f} MiB"
            )
            assert grown < LIMIT, (
                f"RSS grew by {grown / 2**20:.1f} MiB (idle {idle / 2**20:.1f} MiB)"
            )
        finally:
            proc.terminate()
            finish(proc)
            app.close()

    run(scenario(), timeout=300)
