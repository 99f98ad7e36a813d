"""`tpproxy agent-init`: the `tel-agent-init` init container's iptables rules (spec §5.7).

Intercepts whose service reaches the pod by a numeric target port (or a headless service) cannot
be diverted to the agent by renaming the app's port, so the webhook adds this init container: it
redirects each intercepted container port to its agent port in the pod's network namespace.

`plan_rules` is pure: it turns the agent config into an ordered list of `Rule`s. `apply_rules`
runs them with the `iptables` binary, checking each one first (`-C`), so that running the init
container again (a pod whose init container restarted keeps its network namespace) leaves one
copy of every rule.

The plan, for each protocol P (tcp, udp) with a port-unique intercept, once any intercept of the
config needs iptables (the same test as the webhook's, `tpcontrol.injector.podpatch`):

1. `nat` chain `TEL_INBOUND_<P>`, created or flushed;
2. per port-unique intercept of P (named ones included, as in 2.6):
   `-p P --dport <containerPort> -j REDIRECT --to-ports <agentPort>` in that chain;
3. `PREROUTING`: `-p P -j TEL_INBOUND_<P>`, appended (a mesh's rules run first);
4. `OUTPUT` position 1: `-o <lo> -m owner ! --uid-owner <uid> -j TEL_INBOUND_<P>`
   (local callers other than the agent, e.g. a mesh proxy, go through the agent);
5. `OUTPUT` position 1: `-o <lo> -p P ! -d 127.0.0.1/32 -m owner --uid-owner <uid> -j ...`
   (the agent calling its own pod IP is redirected too);

and last, `OUTPUT` position 1 + (rules inserted above): `-m owner --uid-owner <uid> -j RETURN`, so
the agent's own traffic to `127.0.0.1:<containerPort>` reaches the app instead of looping.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tpproxy.config import Sidecar, intercepts, listeners

log = logging.getLogger("tpproxy.agentinit")

TABLE = "nat"
CHAIN_PREFIX = "TEL_INBOUND_"
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
SYS_CLASS_NET = Path("/sys/class/net")
IPTABLES_TIMEOUT = 30.0

Action = Literal["chain", "append", "insert"]


class IptablesError(Exception):
    """An iptables command failed (or iptables is missing); the message names the command."""


@dataclass(frozen=True)
class Rule:
    """One step of the plan.

    `chain`: create `chain` if missing, then flush it (`spec` is empty).
    `append`: `-A chain *spec` unless `-C chain *spec` finds it.
    `insert`: `-I chain position *spec` unless `-C chain *spec` finds it.
    """

    table: str
    chain: str
    spec: tuple[str, ...] = ()
    action: Action = "append"
    position: int = 1

    def args(self) -> list[str]:
        """The iptables arguments that add the rule (for `chain`: the flush)."""
        if self.action == "chain":
            return ["-t", self.table, "-F", self.chain]
        if self.action == "insert":
            return ["-t", self.table, "-I", self.chain, str(self.position), *self.spec]
        return ["-t", self.table, "-A", self.chain, *self.spec]

    def check_args(self) -> list[str]:
        """The iptables arguments that test whether the rule is there (not for `chain`)."""
        return ["-t", self.table, "-C", self.chain, *self.spec]

    def __str__(self) -> str:
        if self.action == "chain":
            return f"-t {self.table} -N {self.chain} (if missing); -t {self.table} -F {self.chain}"
        return _join(self.args())


def _join(args: Sequence[str]) -> str:
    """A command line as a shell would take it; `!` is left bare, as iptables' docs write it."""
    return " ".join(arg if arg == "!" else shlex.quote(arg) for arg in args)


def needs_iptables(sidecar: Sidecar) -> bool:
    """Whether the webhook adds the init container: a numeric target port or a headless service."""
    return any(icept.target_port_numeric or icept.headless for _, icept in intercepts(sidecar))


def plan_rules(sidecar: Sidecar, uid: int, loopback: str) -> list[Rule]:
    """The rules to install, in order; empty when no intercept needs iptables."""
    if not needs_iptables(sidecar):
        return []
    ports = listeners(sidecar)  # port-unique: one per (agentPort, protocol), in config order
    rules: list[Rule] = []
    inserted = 0
    for protocol in ("TCP", "UDP"):
        mine = [listener for listener in ports if listener.protocol == protocol]
        if not mine:
            continue
        p = protocol.lower()
        chain = CHAIN_PREFIX + protocol
        rules.append(Rule(TABLE, chain, action="chain"))
        redirects: list[Rule] = []
        for listener in mine:
            dport, to = str(listener.container_port), str(listener.agent_port)
            spec = ("-p", p, "--dport", dport, "-j", "REDIRECT", "--to-ports", to)
            redirect = Rule(TABLE, chain, spec)
            if redirect not in redirects:
                redirects.append(redirect)
        rules += redirects
        rules.append(Rule(TABLE, "PREROUTING", ("-p", p, "-j", chain)))
        not_agent: tuple[str, ...] = ("-o", loopback, "-m", "owner", "!", "--uid-owner", str(uid))
        rules.append(Rule(TABLE, "OUTPUT", (*not_agent, "-j", chain), "insert", 1))
        to_pod_ip: tuple[str, ...] = ("-o", loopback, "-p", p, "!", "-d", "127.0.0.1/32")
        agent = ("-m", "owner", "--uid-owner", str(uid))
        rules.append(Rule(TABLE, "OUTPUT", (*to_pod_ip, *agent, "-j", chain), "insert", 1))
        inserted += 2
    agent_itself = ("-m", "owner", "--uid-owner", str(uid), "-j", "RETURN")
    rules.append(Rule(TABLE, "OUTPUT", agent_itself, "insert", 1 + inserted))
    return rules


def loopback_interface(sys_class_net: Path = SYS_CLASS_NET) -> str:
    """The first (by ifindex) interface that is up and flagged loopback; `lo` if none is found."""
    found: list[tuple[int, str]] = []
    try:
        entries = list(sys_class_net.iterdir())
    except OSError:
        return "lo"
    for entry in entries:
        try:
            flags = int((entry / "flags").read_text().strip(), 16)
            index = int((entry / "ifindex").read_text().strip())
        except (OSError, ValueError):
            continue
        if flags & IFF_UP and flags & IFF_LOOPBACK:
            found.append((index, entry.name))
    return min(found)[1] if found else "lo"


def _run(iptables: str, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    command = [iptables, "-w", *args]
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise IptablesError(f"{iptables}: not found (the agent image needs iptables)") from None
    except subprocess.TimeoutExpired:
        raise IptablesError(
            f"`{_join(command)}` did not finish within {IPTABLES_TIMEOUT:.0f} s"
        ) from None
    except OSError as exc:
        raise IptablesError(f"`{_join(command)}` could not run: {exc}") from None


def _must(iptables: str, args: Sequence[str]) -> str:
    done = _run(iptables, args)
    if done.returncode != 0:
        raise IptablesError(_failure(iptables, args, done))
    return done.stdout


def _failure(iptables: str, args: Sequence[str], done: subprocess.CompletedProcess[str]) -> str:
    detail = (done.stderr or done.stdout).strip() or "(no output)"
    hint = ""
    if "ermission denied" in detail or "Operation not permitted" in detail:
        hint = " (the init container needs the NET_ADMIN capability, and usually root)"
    command = _join([iptables, "-w", *args])
    return f"`{command}` failed (exit {done.returncode}): {detail}{hint}"


def apply_rules(rules: Sequence[Rule], iptables: str = "iptables") -> None:
    """Make every rule of the plan present, in order; raises IptablesError on the first failure.

    Rules already present are left alone, so a second run changes nothing (the TEL_INBOUND chains
    are flushed and refilled with the same rules).
    """
    if rules and shutil.which(iptables) is None:
        raise IptablesError(
            f"{iptables}: not found on PATH; tel-agent-init needs iptables in the agent image"
        )
    for rule in rules:
        if rule.action == "chain":
            listing = _must(iptables, ["-t", rule.table, "-S"]).splitlines()
            if f"-N {rule.chain}" not in listing:
                _must(iptables, ["-t", rule.table, "-N", rule.chain])
            _must(iptables, rule.args())
            log.info("chain %s (table %s) ready and empty", rule.chain, rule.table)
            continue
        check = _run(iptables, rule.check_args())
        if check.returncode == 0:
            log.info("present: %s", rule)
            continue
        if check.returncode != 1:  # 1 = no such rule; anything else is a real error
            raise IptablesError(_failure(iptables, rule.check_args(), check))
        _must(iptables, rule.args())
        log.info("added: %s", rule)
