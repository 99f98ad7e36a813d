"""`tpproxy agent-init` (the `tel-agent-init` init container, spec §5.7) and the agent's ready file.

The plan is checked without privileges; `apply_rules` against a fake `iptables` that keeps its
table in a JSON file; and, as root, the real thing inside a network namespace of the test's own
(the rules, their idempotency, and a connection that the rules send to the agent port).
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tpproxy.agentinit import (
    IptablesError,
    Rule,
    apply_rules,
    loopback_interface,
    needs_iptables,
    plan_rules,
)
from tpproxy.config import Container, Intercept, Sidecar

from .helpers import free_port

NAMED_HTTP = Intercept(
    service_name="echo", service_port_name="http", container_port_name="http",
    container_port=8080, service_port=80, agent_port=9900,
)  # fmt: skip
NUMERIC_GRPC = Intercept(
    service_name="echo", service_port_name="grpc", target_port_numeric=True,
    container_port=8081, service_port=81, agent_port=9901,
)  # fmt: skip
NUMERIC_ALT = Intercept(
    service_name="echo-alt", target_port_numeric=True,
    container_port=8080, service_port=8080, agent_port=9900,
)  # fmt: skip
NUMERIC_DNS = Intercept(
    service_name="dns", target_port_numeric=True, protocol="UDP",
    container_port=5353, service_port=53, agent_port=9902,
)  # fmt: skip
HEADLESS_NAMED = Intercept(
    service_name="db", service_port_name="pg", container_port_name="pg", headless=True,
    container_port=5432, service_port=5432, agent_port=9903,
)  # fmt: skip


def sidecar(*intercepts: Intercept) -> Sidecar:
    return Sidecar(
        agent_name="echo",
        namespace="default",
        containers=(Container(name="echo", intercepts=intercepts),),
    )


def lines(rules: list[Rule]) -> list[str]:
    return [str(rule) for rule in rules]


def tcp_block(uid: int = 0, lo: str = "lo") -> list[str]:
    return [
        "-t nat -N TEL_INBOUND_TCP (if missing); -t nat -F TEL_INBOUND_TCP",
        "-t nat -A TEL_INBOUND_TCP -p tcp --dport 8080 -j REDIRECT --to-ports 9900",
        "-t nat -A TEL_INBOUND_TCP -p tcp --dport 8081 -j REDIRECT --to-ports 9901",
        "-t nat -A PREROUTING -p tcp -j TEL_INBOUND_TCP",
        f"-t nat -I OUTPUT 1 -o {lo} -m owner ! --uid-owner {uid} -j TEL_INBOUND_TCP",
        f"-t nat -I OUTPUT 1 -o {lo} -p tcp ! -d 127.0.0.1/32 -m owner --uid-owner {uid} "
        "-j TEL_INBOUND_TCP",
    ]


def udp_block(uid: int = 0, lo: str = "lo") -> list[str]:
    return [
        "-t nat -N TEL_INBOUND_UDP (if missing); -t nat -F TEL_INBOUND_UDP",
        "-t nat -A TEL_INBOUND_UDP -p udp --dport 5353 -j REDIRECT --to-ports 9902",
        "-t nat -A PREROUTING -p udp -j TEL_INBOUND_UDP",
        f"-t nat -I OUTPUT 1 -o {lo} -m owner ! --uid-owner {uid} -j TEL_INBOUND_UDP",
        f"-t nat -I OUTPUT 1 -o {lo} -p udp ! -d 127.0.0.1/32 -m owner --uid-owner {uid} "
        "-j TEL_INBOUND_UDP",
    ]


# --- the plan -----------------------------------------------------------------------------------


def test_only_named_target_ports_need_no_rules() -> None:
    config = sidecar(NAMED_HTTP)
    assert not needs_iptables(config)
    assert plan_rules(config, 0, "lo") == []
    assert plan_rules(Sidecar(), 0, "lo") == []


def test_tcp_only_redirects_every_port_unique_intercept_named_ones_included() -> None:
    """§2.4: once an intercept is numeric, all port-unique intercepts are redirected; the two
    intercepts on container port 8080 share agent port 9900 and give one rule."""
    rules = plan_rules(sidecar(NAMED_HTTP, NUMERIC_GRPC, NUMERIC_ALT), 0, "lo")
    assert lines(rules) == [
        *tcp_block(),
        "-t nat -I OUTPUT 3 -m owner --uid-owner 0 -j RETURN",
    ]


def test_udp_only() -> None:
    rules = plan_rules(sidecar(NUMERIC_DNS), 1000, "lo")
    assert lines(rules) == [
        *udp_block(uid=1000),
        "-t nat -I OUTPUT 3 -m owner --uid-owner 1000 -j RETURN",
    ]


def test_tcp_and_udp_the_return_rule_follows_all_four_inserted_rules() -> None:
    rules = plan_rules(sidecar(NAMED_HTTP, NUMERIC_GRPC, NUMERIC_DNS), 0, "lo")
    assert lines(rules) == [
        *tcp_block(),
        *udp_block(),
        "-t nat -I OUTPUT 5 -m owner --uid-owner 0 -j RETURN",
    ]
    ret = rules[-1]
    assert (ret.action, ret.position) == (
        "insert",
        1 + sum(r.action == "insert" for r in rules[:-1]),
    )


def test_uid_and_loopback_name_appear_in_the_owner_rules() -> None:
    rules = plan_rules(sidecar(NUMERIC_GRPC), 4242, "lo0")
    owner_rules = [r for r in rules if "owner" in r.spec]
    assert len(owner_rules) == 3
    assert all("4242" in r.spec for r in owner_rules)
    assert [r.spec[1] for r in owner_rules if r.spec[0] == "-o"] == ["lo0", "lo0"]


def test_headless_service_needs_iptables_even_with_a_named_port() -> None:
    rules = plan_rules(sidecar(HEADLESS_NAMED), 0, "lo")
    assert "-t nat -A TEL_INBOUND_TCP -p tcp --dport 5432 -j REDIRECT --to-ports 9903" in lines(
        rules
    )


def test_redirects_cover_all_containers() -> None:
    config = Sidecar(
        containers=(
            Container(name="a", intercepts=(NUMERIC_GRPC,)),
            Container(name="b", intercepts=(NAMED_HTTP,)),
        )
    )
    redirects = [r for r in plan_rules(config, 0, "lo") if "REDIRECT" in r.spec]
    assert [r.spec[3] for r in redirects] == ["8081", "8080"]


def test_loopback_is_the_first_up_loopback_interface(tmp_path: Path) -> None:
    def iface(name: str, index: int, flags: int) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "ifindex").write_text(f"{index}\n")
        (tmp_path / name / "flags").write_text(f"{flags:#x}\n")

    assert loopback_interface(tmp_path / "missing") == "lo"
    iface("eth0", 2, 0x1003)  # up, broadcast: not loopback
    assert loopback_interface(tmp_path) == "lo"
    iface("lo9", 9, 0x8)  # loopback but down
    iface("lo5", 5, 0x9)
    iface("lo7", 7, 0x9)
    assert loopback_interface(tmp_path) == "lo5"


# --- apply_rules against a fake iptables ---------------------------------------------------------

FAKE_IPTABLES = """\
import json, os, sys
args = [a for a in sys.argv[1:] if a != "-w"]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
fail = os.environ.get("FAKE_FAIL")
if fail and fail in " ".join(args):
    sys.exit("iptables v1.8.9: Permission denied (you must be root)")
path = os.environ["FAKE_STATE"]
builtin = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]
state = json.load(open(path)) if os.path.exists(path) else {c: [] for c in builtin}
assert args[:2] == ["-t", "nat"], args
op, chain, rest = args[2], args[3] if len(args) > 3 else "", args[4:]
if op == "-S":
    print("\\n".join(f"-P {c} ACCEPT" if c in builtin else f"-N {c}" for c in state))
    print("\\n".join(f"-A {c} {r}" for c, rules in state.items() for r in rules))
elif op == "-N":
    if chain in state:
        sys.exit("iptables: Chain already exists.")
    state[chain] = []
elif op == "-F":
    state[chain] = []
elif op == "-C":
    sys.exit(0 if " ".join(rest) in state[chain] else 1)
elif op == "-A":
    state[chain].append(" ".join(rest))
elif op == "-I":
    if int(rest[0]) > len(state[chain]) + 1:
        sys.exit("iptables: Index of insertion too big.")
    state[chain].insert(int(rest[0]) - 1, " ".join(rest[1:]))
json.dump(state, open(path, "w"))
"""


@pytest.fixture
def fake_iptables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "iptables"
    path.write_text(f"#!{sys.executable}\n{FAKE_IPTABLES}")
    path.chmod(0o755)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("FAKE_STATE", str(tmp_path / "nat.json"))
    return path


def fake_state(fake: Path) -> dict[str, list[str]]:
    state: dict[str, list[str]] = json.loads((fake.parent / "nat.json").read_text())
    return state


def fake_calls(fake: Path) -> list[str]:
    log = fake.parent / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_apply_twice_gives_one_copy_of_each_rule_in_order(fake_iptables: Path) -> None:
    rules = plan_rules(sidecar(NAMED_HTTP, NUMERIC_GRPC, NUMERIC_DNS), 0, "lo")
    apply_rules(rules, str(fake_iptables))
    first = fake_state(fake_iptables)
    assert first["OUTPUT"] == [
        "-o lo -p udp ! -d 127.0.0.1/32 -m owner --uid-owner 0 -j TEL_INBOUND_UDP",
        "-o lo -m owner ! --uid-owner 0 -j TEL_INBOUND_UDP",
        "-o lo -p tcp ! -d 127.0.0.1/32 -m owner --uid-owner 0 -j TEL_INBOUND_TCP",
        "-o lo -m owner ! --uid-owner 0 -j TEL_INBOUND_TCP",
        "-m owner --uid-owner 0 -j RETURN",
    ]
    assert first["PREROUTING"] == ["-p tcp -j TEL_INBOUND_TCP", "-p udp -j TEL_INBOUND_UDP"]
    assert first["TEL_INBOUND_TCP"] == [
        "-p tcp --dport 8080 -j REDIRECT --to-ports 9900",
        "-p tcp --dport 8081 -j REDIRECT --to-ports 9901",
    ]
    calls_before = len(fake_calls(fake_iptables))
    apply_rules(rules, str(fake_iptables))
    assert fake_state(fake_iptables) == first
    second = fake_calls(fake_iptables)[calls_before:]
    # The chains are flushed and refilled; nothing else is added.
    changes = [c for c in second if c.split()[2] in ("-A", "-I", "-N")]
    assert changes == [
        "-t nat -A TEL_INBOUND_TCP -p tcp --dport 8080 -j REDIRECT --to-ports 9900",
        "-t nat -A TEL_INBOUND_TCP -p tcp --dport 8081 -j REDIRECT --to-ports 9901",
        "-t nat -A TEL_INBOUND_UDP -p udp --dport 5353 -j REDIRECT --to-ports 9902",
    ]


def test_a_failing_command_is_named_with_its_error(
    fake_iptables: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FAIL", "-N TEL_INBOUND_TCP")
    with pytest.raises(IptablesError) as failed:
        apply_rules(plan_rules(sidecar(NUMERIC_GRPC), 0, "lo"), str(fake_iptables))
    message = str(failed.value)
    assert f"`{fake_iptables} -w -t nat -N TEL_INBOUND_TCP` failed (exit 1)" in message
    assert "Permission denied (you must be root)" in message
    assert "NET_ADMIN" in message


def test_missing_iptables_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IptablesError, match="not found on PATH; tel-agent-init needs iptables"):
        apply_rules(plan_rules(sidecar(NUMERIC_GRPC), 0, "lo"), str(tmp_path / "iptables"))
    apply_rules([], str(tmp_path / "iptables"))  # nothing to do: iptables is not even looked for


# --- the command --------------------------------------------------------------------------------

CONFIG = """\
agentName: echo
namespace: default
containers:
- name: echo
  intercepts:
  - {serviceName: echo, servicePortName: http, containerPortName: http, containerPort: 8080, servicePort: 80, agentPort: 9900}
"""
NUMERIC = """\
  - {serviceName: echo, servicePortName: grpc, targetPortNumeric: true, containerPort: 8081, servicePort: 81, agentPort: 9901}
"""
UDP = """\
  - {serviceName: dns, targetPortNumeric: true, protocol: UDP, containerPort: 5353, servicePort: 53, agentPort: 9902}
"""


def agent_init(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "tpproxy", "agent-init", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def test_command_without_numeric_ports_exits_0_and_runs_nothing(
    tmp_path: Path, fake_iptables: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    code, _, err = agent_init("--config", str(config), "--iptables", str(fake_iptables))
    assert code == 0, err
    assert "no iptables rules needed" in err
    assert fake_calls(fake_iptables) == []
    # The config may come from $TPPROXY_CONFIG too; iptables is not even needed.
    code, _, err = agent_init(env={"TPPROXY_CONFIG": str(config), "PATH": str(tmp_path)})
    assert code == 0, err
    assert "no iptables rules needed" in err
    assert fake_calls(fake_iptables) == []


def test_command_installs_and_logs_one_line_per_rule(tmp_path: Path, fake_iptables: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG + NUMERIC)
    code, out, err = agent_init("-c", str(config), "--iptables", str(fake_iptables))
    assert code == 0, err
    assert out == ""
    uid = os.getuid()
    expected = [
        "chain TEL_INBOUND_TCP (table nat) ready and empty",
        "added: -t nat -A TEL_INBOUND_TCP -p tcp --dport 8080 -j REDIRECT --to-ports 9900",
        "added: -t nat -A TEL_INBOUND_TCP -p tcp --dport 8081 -j REDIRECT --to-ports 9901",
        "added: -t nat -A PREROUTING -p tcp -j TEL_INBOUND_TCP",
        f"-I OUTPUT 1 -o lo -m owner ! --uid-owner {uid} -j TEL_INBOUND_TCP",
        f"-I OUTPUT 1 -o lo -p tcp ! -d 127.0.0.1/32 -m owner --uid-owner {uid} -j TEL_INBOUND_TCP",
        f"added: -t nat -I OUTPUT 3 -m owner --uid-owner {uid} -j RETURN",
    ]
    for line in expected:
        assert line in err
    assert err.count("added: ") == 6
    code, _, err = agent_init("-c", str(config), "--iptables", str(fake_iptables))
    assert code == 0, err
    assert err.count("present: ") == 4  # the chain's own rules are refilled after the flush


def test_command_dry_run_prints_the_plan(tmp_path: Path, fake_iptables: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG + NUMERIC + UDP)
    code, out, err = agent_init("-c", str(config), "--dry-run", "--iptables", str(fake_iptables))
    assert code == 0, err
    assert len(out.splitlines()) == 12
    assert (
        out.splitlines()[-1] == f"-t nat -I OUTPUT 5 -m owner --uid-owner {os.getuid()} -j RETURN"
    )
    assert (
        "agent port 9902/UDP (container echo port 5353) is redirected but not forwarded" in err
    )  # tpproxy has no UDP yet
    assert fake_calls(fake_iptables) == []


def test_command_config_error_exits_2_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("agentPort: 9900", "agentPort: ninety"))
    code, _, err = agent_init("--config", str(config))
    assert code == 2
    assert f"tpproxy: error: {config}" in err
    assert "$.containers[0].intercepts[0].agentPort" in err
    code, _, err = agent_init("--config", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "nope.yaml: cannot read" in err


def test_command_iptables_failure_exits_1(tmp_path: Path, fake_iptables: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG + NUMERIC)
    code, _, err = agent_init(
        "-c", str(config), "--iptables", str(fake_iptables), env={"FAKE_FAIL": "-A PREROUTING"}
    )
    assert code == 1
    assert "tpproxy: error: `" in err
    assert "-t nat -A PREROUTING -p tcp -j TEL_INBOUND_TCP` failed (exit 1)" in err
    assert "Permission denied" in err
    code, _, err = agent_init("-c", str(config), "--iptables", str(tmp_path / "no-iptables"))
    assert code == 1
    assert "not found on PATH" in err


# --- as root, in a network namespace of our own -------------------------------------------------

POD_IP = "10.123.0.2"

SERVER = """\
import select, socket, sys
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen()
    socks.append(s)
print("listening", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        conn, _ = s.accept()
        conn.sendall(str(s.getsockname()[1]).encode())  # which listener took the connection
        conn.close()
"""

CLIENT = """\
import encodings.idna, os, socket, sys  # idna: loaded while the interpreter's files are readable
host, port, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if uid != os.getuid():
    os.setgid(uid)
    os.setuid(uid)
with socket.create_connection((host, port), timeout=5) as s:
    s.settimeout(5)
    print(s.recv(16).decode())
"""


def in_netns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def must(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}: {done.stderr}"
    return done.stdout


def nat_rules(ns: str | None) -> list[str]:
    cmd = ["iptables-save", "-t", "nat"]
    out = must(in_netns(ns, *cmd) if ns else cmd)
    return [line for line in out.splitlines() if line.startswith("-")]


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with `lo` up and a pod IP on it; always deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace and iptables rules inside it")
    if shutil.which("ip") is None:
        pytest.skip("needs `ip` (iproute2) to create a network namespace")
    missing = [b for b in ("iptables", "iptables-save") if shutil.which(b) is None]
    if missing:
        message = "missing " + ", ".join(missing) + " (Debian package iptables)"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run must install it")
        pytest.skip(message)
    name = f"tpinit-{secrets.token_hex(4)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        must(in_netns(name, "ip", "link", "set", "lo", "up"))
        must(in_netns(name, "ip", "addr", "add", f"{POD_IP}/32", "dev", "lo"))
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def connect(ns: str, host: str, port: int, uid: int = 0) -> str:
    """Which listener (by port) answers a connection to host:port made from inside `ns`."""
    out = must(in_netns(ns, sys.executable, "-c", CLIENT, host, str(port), str(uid)))
    return out.strip()


def test_rules_in_a_network_namespace_redirect_to_the_agent(netns: str, tmp_path: Path) -> None:
    root_before = nat_rules(None)
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG + NUMERIC + UDP)
    command = in_netns(
        netns, sys.executable, "-m", "tpproxy", "agent-init", "--config", str(config)
    )
    must(command)
    expected = [
        "-A PREROUTING -p tcp -j TEL_INBOUND_TCP",
        "-A PREROUTING -p udp -j TEL_INBOUND_UDP",
        "-A OUTPUT ! -d 127.0.0.1/32 -o lo -p udp -m owner --uid-owner 0 -j TEL_INBOUND_UDP",
        "-A OUTPUT -o lo -m owner ! --uid-owner 0 -j TEL_INBOUND_UDP",
        "-A OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 0 -j TEL_INBOUND_TCP",
        "-A OUTPUT -o lo -m owner ! --uid-owner 0 -j TEL_INBOUND_TCP",
        "-A OUTPUT -m owner --uid-owner 0 -j RETURN",
        "-A TEL_INBOUND_TCP -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 9900",
        "-A TEL_INBOUND_TCP -p tcp -m tcp --dport 8081 -j REDIRECT --to-ports 9901",
        "-A TEL_INBOUND_UDP -p udp -m udp --dport 5353 -j REDIRECT --to-ports 9902",
    ]
    assert nat_rules(netns) == expected
    out = must(command)  # the init container ran again: same rules, no duplicates
    assert out == ""
    assert nat_rules(netns) == expected
    assert nat_rules(None) == root_before  # the host's own table was never touched

    server = subprocess.Popen(
        in_netns(netns, sys.executable, "-c", SERVER, "8080", "9900"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 15)
        assert ready, "the listener in the namespace did not start"
        assert server.stdout.readline().strip() == "listening", server.stderr
        # The agent (same uid) calling its own pod IP goes to the agent port (rule 5) ...
        assert connect(netns, POD_IP, 8080) == "9900"
        # ... its calls to 127.0.0.1:<app port> reach the app (the RETURN rule) ...
        assert connect(netns, "127.0.0.1", 8080) == "8080"
        # ... and any other local process (another uid) is sent through the agent (rule 4).
        assert connect(netns, "127.0.0.1", 8080, uid=65534) == "9900"
    finally:
        server.kill()
        server.wait()


# --- the agent's ready file (the readiness probe stats it) ---------------------------------------

AGENT_CONFIG = """\
agentName: echo
namespace: default
containers:
- name: echo
  intercepts:
  - {{serviceName: echo, servicePortName: http, containerPort: {app}, servicePort: 80, agentPort: {agent}}}
"""


def start_agent(tmp_path: Path, ready: Path) -> tuple[subprocess.Popen[bytes], int]:
    agent = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(AGENT_CONFIG.format(app=free_port(), agent=agent))
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "tpproxy", "agent", "--config", str(config),
            "--manager-url", f"http://127.0.0.1:{free_port()}",
            "--listen-host", "127.0.0.1", "--admin", "off", "--drain-timeout", "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TPPROXY_READY_FILE": str(ready)},
    )  # fmt: skip
    return proc, agent


def wait_until(predicate: Callable[[], bool], proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the agent exited early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within 15 s")


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    return err.decode()


def test_agent_writes_the_ready_file_while_serving_and_removes_it(tmp_path: Path) -> None:
    ready = tmp_path / "agent" / "ready"  # the directory is created too
    proc, port = start_agent(tmp_path, ready)
    try:
        wait_until(ready.exists, proc, "the ready file")
        assert port_open(port)  # written once the listeners are bound
        assert ready.read_text().strip() == str(proc.pid)
        stop(proc)
        assert not ready.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_agent_serves_even_if_the_ready_file_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    proc, port = start_agent(tmp_path, blocker / "ready")
    try:
        wait_until(lambda: port_open(port), proc, "the agent port opening")
        err = stop(proc)
        assert "cannot write the ready file" in err
        assert "serving anyway" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
