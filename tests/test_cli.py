"""`tpproxy` as a process: exit codes, errors on bad input, admin endpoint, SIGTERM draining."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import EchoProtocol, free_port, open_conn, read_exactly, run, start_server

AGENT_CONFIG = """\
agentName: echo
namespace: default
containers:
- name: echo
  intercepts:
  - {{serviceName: echo, servicePortName: http, containerPort: {app}, servicePort: 80, agentPort: {agent}}}
"""


def tpproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tpproxy", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def finish(proc: subprocess.Popen[bytes], timeout: float = 15) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode()


def http_get(port: int, path: str) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Block until `port` accepts, failing early if the process exits."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tpproxy exited early: {finish(proc)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"port {port} never opened")


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        "containers:\n- name: echo\n  intercepts:\n  - {agentPort: ninety, containerPort: 80}\n"
    )
    return path


def test_schema_violation_exits_2_naming_file_and_field(bad_config: Path) -> None:
    admin = free_port()
    code, err = finish(tpproxy("run", "--config", str(bad_config), "--admin", f"127.0.0.1:{admin}"))
    assert code == 2
    assert str(bad_config) in err
    assert "$.containers[0].intercepts[0].agentPort" in err
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", admin), timeout=1)  # nothing was started


def test_malformed_yaml_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"containers: [\x00\xff")
    code, err = finish(tpproxy("run", "--config", str(path), "--admin", "off"))
    assert code == 2
    assert str(path) in err


def test_missing_config_and_bad_env_exit_2(tmp_path: Path) -> None:
    code, err = finish(tpproxy("run", "--config", str(tmp_path / "nope.yaml")))
    assert code == 2
    assert "nope.yaml: cannot read" in err
    code, err = finish(tpproxy("run", "--forward", "1=2", env={"TPPROXY_BACKLOG": "lots"}))
    assert code == 2
    assert "TPPROXY_BACKLOG" in err
    code, err = finish(tpproxy("run"))
    assert code == 2
    assert "--config" in err


def test_port_in_use_names_the_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        config = tmp_path / "config.yaml"
        config.write_text(AGENT_CONFIG.format(app=free_port(), agent=busy))
        code, err = finish(
            tpproxy("run", "-c", str(config), "--listen-host", "127.0.0.1", "--admin", "off")
        )
    assert code == 1
    assert f"127.0.0.1:{busy}: address already in use" in err


def test_check_config_lists_listeners() -> None:
    path = Path(__file__).parent / "data" / "echo-agent.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "tpproxy", "check-config", str(path)],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    assert "9900/TCP -> echo:8080  (echo:http, echo-alt:8080)" in out
    assert "9901/TCP -> echo:8081  (echo:grpc)" in out


def test_serves_config_reports_metrics_and_drains_on_sigterm(tmp_path: Path) -> None:
    """A connection in flight at SIGTERM finishes; new ones are refused; exit 0 after it closes."""

    async def scenario() -> None:
        _, app_port = await start_server(EchoProtocol)
        agent, admin = free_port(), free_port()
        config = tmp_path / "config.yaml"
        config.write_text(AGENT_CONFIG.format(app=app_port, agent=agent))
        proc = tpproxy(
            "run",
            "-c",
            str(config),
            "--listen-host",
            "127.0.0.1",
            "--admin",
            f"127.0.0.1:{admin}",
            "--drain-timeout",
            "30",
            "--log-format",
            "json",
        )
        try:
            await asyncio.to_thread(wait_for_port, agent, proc)
            await asyncio.to_thread(wait_for_port, admin, proc)
            assert (await asyncio.to_thread(http_get, admin, "/livez"))[0] == 200
            status, body = await asyncio.to_thread(http_get, admin, "/readyz")
            assert status == 200
            assert str(agent) in body

            reader, writer = await open_conn(agent)
            writer.write(b"x" * 1000)
            assert await read_exactly(reader, 1000) == b"x" * 1000
            status, metrics = await asyncio.to_thread(http_get, admin, "/metrics")
            labels = f'port="{agent}",route="app",target="127.0.0.1:{app_port}"'
            assert f"tpproxy_connections_open{{{labels}}} 1.0" in metrics
            assert f'tpproxy_bytes_total{{direction="to_target",{labels}}} 1000.0' in metrics

            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_refused, agent)
            writer.write(b"after sigterm")
            assert await read_exactly(reader, 13) == b"after sigterm"
            assert proc.poll() is None  # still draining: our connection is open
            writer.close()
            code, err = await asyncio.to_thread(finish, proc)
            assert code == 0, err
            assert '"msg":"SIGTERM: draining"' in err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    run(scenario())


def test_drain_timeout_closes_stuck_connections(tmp_path: Path) -> None:
    async def scenario() -> None:
        _, app_port = await start_server(EchoProtocol)
        agent = free_port()
        proc = tpproxy(
            "run",
            "--forward",
            f"{agent}=127.0.0.1:{app_port}",
            "--listen-host",
            "127.0.0.1",
            "--admin",
            "off",
            "--drain-timeout",
            "0.3",
        )
        try:
            await asyncio.to_thread(wait_for_port, agent, proc)
            reader, _ = await open_conn(agent)
            proc.send_signal(signal.SIGTERM)
            code, err = await asyncio.to_thread(finish, proc)
            assert code == 0
            assert "closed 1 connection(s) still open" in err
            async with asyncio.timeout(2):
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read() == b""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    run(scenario())


def test_sighup_reloads_config_and_keeps_old_one_when_broken(tmp_path: Path) -> None:
    async def scenario() -> None:
        _, app_port = await start_server(EchoProtocol)
        first, second = free_port(), free_port()
        config = tmp_path / "config.yaml"
        config.write_text(AGENT_CONFIG.format(app=app_port, agent=first))
        proc = tpproxy("run", "-c", str(config), "--listen-host", "127.0.0.1", "--admin", "off")
        try:
            await asyncio.to_thread(wait_for_port, first, proc)
            config.write_text("containers: [oops")
            proc.send_signal(signal.SIGHUP)
            config.write_text(AGENT_CONFIG.format(app=app_port, agent=second))
            proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(wait_for_port, second, proc)
            await asyncio.to_thread(wait_refused, first)
            proc.send_signal(signal.SIGTERM)
            code, _err = await asyncio.to_thread(finish, proc)
            assert code == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    run(scenario())


def wait_refused(port: int, timeout: float = 10) -> None:
    """Block until `port` stops accepting."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.02)
    raise AssertionError(f"port {port} still accepts")


def test_http_mode_with_intercepts_file_and_bad_intercepts(tmp_path: Path) -> None:
    async def scenario() -> None:
        from .http_servers import Upstream

        app = await Upstream("app").start()
        alice = await Upstream("alice").start()
        port = free_port()
        specs = tmp_path / "intercepts.yaml"
        specs.write_text(
            f"- id: alice\n  port: {port}\n  mechanism: http\n  target: 127.0.0.1:{alice.port}\n"
            "  headers: [{name: X-Dev, value: alice}]\n"
        )
        proc = tpproxy(
            "run",
            "--forward",
            f"{port}=127.0.0.1:{app.port}",
            "--mode",
            "http",
            "--intercepts",
            str(specs),
            "--listen-host",
            "127.0.0.1",
            "--admin",
            "off",
            "--http-parser",
            "h11",
        )
        try:
            await asyncio.to_thread(wait_for_port, port, proc)
            reader, writer = await open_conn(port)
            writer.write(
                b"GET /a HTTP/1.1\r\nHost: s\r\n\r\nGET /b HTTP/1.1\r\nHost: s\r\nx-dev: alice\r\n\r\n"
            )
            async with asyncio.timeout(5):
                data = b""
                while b"alice GET /b" not in data:
                    chunk = await reader.read(65536)
                    assert chunk
                    data += chunk
            assert b"app GET /a" in data
            writer.close()
        finally:
            proc.terminate()
            finish(proc)
            app.close()
            alice.close()

    run(scenario())

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "- id: x\n  port: 9900\n  mechanism: http\n  target: 127.0.0.1:1\n  headers: [{name: a, op: regex, value: '('}]\n"
    )
    code, err = finish(
        tpproxy("run", "--forward", "9900=127.0.0.1:1", "--intercepts", str(bad), "--admin", "off")
    )
    assert code == 2
    assert f"{bad}: [0] (id 'x').headers[0]: invalid regex '('" in err
    bad.write_text("- id: x\n  port: 9900\n  mechanism: smtp\n  target: 127.0.0.1:1\n")
    code, err = finish(
        tpproxy("run", "--forward", "9900=127.0.0.1:1", "--intercepts", str(bad), "--admin", "off")
    )
    assert code == 2
    assert "at `$[0].mechanism`" in err


def test_explain_command(tmp_path: Path) -> None:
    specs = tmp_path / "intercepts.yaml"
    specs.write_text(
        "- {id: alice, port: 9900, mechanism: http, target: '127.0.0.1:7001', headers: [{name: x-dev, value: alice}]}\n"
    )

    def explain(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "tpproxy",
                "explain",
                "--intercepts",
                str(specs),
                "--port",
                "9900",
                *args,
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    assert explain("-H", "x-dev: alice").stdout.splitlines()[-1] == "=> alice (127.0.0.1:7001)"
    assert explain("-H", "x-dev: bob").stdout.splitlines()[-1] == "=> app (the app)"
    bad = explain("-H", "no colon")
    assert bad.returncode == 2
    assert "--header 'no colon'" in bad.stderr
    # A gRPC call is an HTTP/2 stream: its metadata are headers, its method the :path.
    grpc = ("--http2", "--method", "POST", "--path", "/shop.Cart/Add")
    assert explain(*grpc, "-H", "x-dev: alice").stdout.splitlines()[-1] == (
        "=> alice (127.0.0.1:7001)"
    )
    assert explain(*grpc, "-H", "X-Dev: bob").stdout.splitlines()[-1] == "=> app (the app)"


def test_out_of_file_descriptors_sheds_connections_and_recovers() -> None:
    """With a 64-descriptor limit and 150 clients, some connections are refused, none hangs the
    engine, and once they are gone a new connection is served and SIGTERM still stops it."""

    async def scenario() -> None:
        _, app_port = await start_server(EchoProtocol)
        port = free_port()
        proc = subprocess.Popen(
            [
                "bash",
                "-c",
                f"ulimit -n 64; exec {sys.executable} -m tpproxy run --forward "
                f"{port}=127.0.0.1:{app_port} --listen-host 127.0.0.1 --admin off --drain-timeout 1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            await asyncio.to_thread(wait_for_port, port, proc)
            conns = []
            for _ in range(150):
                try:
                    async with asyncio.timeout(2):
                        conns.append(await open_conn(port))
                except (OSError, TimeoutError):
                    break
            served = 0
            for _, writer in conns:
                writer.write(b"x")
            for reader, _ in conns:
                try:
                    async with asyncio.timeout(1):
                        served += await reader.read(1) == b"x"
                except (OSError, TimeoutError):
                    pass
            assert 0 < served < 150  # some served, the rest shed rather than queued forever
            for _, writer in conns:
                writer.close()
            # The engine frees descriptors as it sees the closes: retry, bounded, until served.
            echoed = b""
            for _ in range(50):
                reader, writer = await open_conn(port)
                writer.write(b"after")
                try:
                    echoed = await read_exactly(reader, 5, timeout=0.2)
                except (OSError, TimeoutError, asyncio.IncompleteReadError):
                    echoed = b""
                writer.close()
                if echoed:
                    break
            assert echoed == b"after"
            proc.send_signal(signal.SIGTERM)
            code, _ = await asyncio.to_thread(finish, proc)
            assert code == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    run(scenario())


def test_agent_command_forwards_to_the_app_while_the_manager_is_unreachable(tmp_path: Path) -> None:
    async def scenario() -> None:
        _, app_port = await start_server(EchoProtocol)
        agent = free_port()
        config = tmp_path / "config.yaml"
        config.write_text(AGENT_CONFIG.format(app=app_port, agent=agent))
        proc = tpproxy(
            "agent",
            "--config",
            str(config),
            "--manager-url",
            f"http://127.0.0.1:{free_port()}",
            "--listen-host",
            "127.0.0.1",
            "--admin",
            "off",
            "--drain-timeout",
            "1",
            env={"TPPROXY_READY_FILE": str(tmp_path / "ready")},
        )
        try:
            await asyncio.to_thread(wait_for_port, agent, proc)
            reader, writer = await open_conn(agent)
            writer.write(b"ping")
            assert await read_exactly(reader, 4) == b"ping"
            writer.close()
            proc.send_signal(signal.SIGTERM)
            code, err = await asyncio.to_thread(finish, proc)
            assert code == 0, err
            assert "manager session ended" in err  # it kept trying, and said so
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    run(scenario())
