"""The traffic-manager's in-memory state: sessions, intercepts and the rules between them.

Plain Python on purpose: no asyncio, no I/O, no Kubernetes. The manager service
(`tpcontrol.manager.api`) calls these methods from its request handlers, asks `changes()` which
watchers to wake (or compares `version`, or listens to `on_change`), and calls `expire()` and
`check_waiting()` from a housekeeping loop. Keeping the rules here means they are tested with
a fake clock, without an API server or a single sleep. Everything runs on the event loop's
thread, so no locking.

What the state keeps (spec 4.5 and 6, in our own JSON API):

- Sessions. `arrive_client` / `arrive_agent` return an unguessable session id
  (`secrets.token_urlsafe`); `remain` is the heartbeat; sessions not heard from for longer than
  their TTL (agents 15 s, clients 60 s: `tpcontrol.names`) are dropped by `expire`, with the
  same effects as `depart`. Each session is bound to the identity that opened it (`owner`),
  and the manager lets only that identity use it, so a session id is not a credential: as in
  Telepresence 2.6,
  an intercept id is `<clientSessionId>:<name>`, shown to agents, in listings and as the default
  routing header, and knowing it lets nobody else act for the session.
- Intercepts, created by clients and reviewed by agents. Their dispositions:

  ============ =================================================================================
  WAITING     Set by the manager on creation (message "Waiting for the agent"), when an agent
              arrives for a NO_AGENT / NO_MECHANISM intercept, and when the pod that made it
              ACTIVE (or AGENT_ERROR) goes away. Agents apply WAITING intercepts and review them.
  ACTIVE      Set by an agent's review: its routes are applied; `podIp`, `environment` and
              `mechanismDesc` describe the serving pod.
  AGENT_ERROR Set by an agent's review: the agent could not apply the intercept (message says why).
  BAD_ARGS    Set by an agent's review: the intercept's arguments are invalid for the agent. The
              manager never overwrites it; only that agent's pod or the client's removal ends it.
  NO_AGENT    Set by `check_waiting`: no agent of the workload appeared within `no_agent_timeout`
              of the intercept starting to wait. The intercept stays listed; the client decides
              whether to leave. An agent's arrival turns it back to WAITING.
  NO_MECHANISM Set by the manager when agents of the workload are present but none of them
              advertises the intercept's mechanism (an `http` intercept on a tcp-only agent).
              An agent that has it turns it back to WAITING.
  REMOVED     Never stored: the disposition of the copies that removals return, so the caller
              can tell watchers what ended.
  ============ =================================================================================

  (2.6's NO_CLIENT and NO_PORTS were never set by 2.6 either and are left out.)

Decisions where the spec is silent or where we differ from 2.6 on purpose:

- Conflicts are decided by the manager at creation, not by the agent. 2.6's OSS agent served one
  intercept per pod; our agent routes per port and per request, so the manager applies the
  rules the agent's route table enforces (`tpproxy.routing.port_routes`): a `tcp` intercept
  owns a whole port, `http` intercepts share one unless their rules are identical. Refusing
  here gives the client an immediate error naming both intercepts instead of an AGENT_ERROR
  later, and guarantees that the specs an agent receives never make its route table fail.
- A port is the same port when either the container port or the agent port is equal. Agent
  ports are allocated one per container port number (spec 1.6), so the two normally agree;
  comparing both also catches a request whose fields disagree with each other.
- Every listed intercept claims its port, whatever its disposition, because a NO_AGENT or
  WAITING intercept becomes ACTIVE as soon as an agent shows up (stale claims end with the
  owning session, as spec 6.4 describes).
- Http rules are compared as the agent will apply them: header names lower-cased, headers as a
  set of (name, op, value), methods upper-cased as a set, and an intercept with no rule at all
  compared by Telepresence's default rule (`x-telepresence-intercept-id` equal to its id), so two
  rule-less http intercepts never conflict.
- Reviews: while WAITING the first review wins (any agent of the workload). Afterwards only the
  pod that won (identified by `podName`, or by the session id when the agent gave no pod name)
  may change the disposition, e.g. ACTIVE -> AGENT_ERROR and back when it re-applies after a
  reconnect with a new session. Reviews that do not apply are ignored (`review` returns False),
  as 2.6 ignores reviews of intercepts that are no longer WAITING.
- Agent departure: when the pod that reviewed an intercept has no session left, the intercept
  goes back to WAITING so that a remaining replica reviews it and its pod IP is current (2.6
  does this for ACTIVE); when the last agent of the workload leaves, ACTIVE and AGENT_ERROR
  intercepts go back to WAITING and the NO_AGENT timer restarts from that moment, so a
  rollout does not turn a long-lived intercept into NO_AGENT at once.
- NO_MECHANISM is set only when no present agent has the mechanism: during a rollout from an
  older agent, some pods having it is enough to serve (and a hard error would make the client
  leave).
- `to_agent_specs` gives an agent only intercepts whose mechanism it advertises.
- `createdAt` is wall-clock time (`wall_clock`, seconds since the epoch) because clients show
  it; TTLs and timeouts use the monotonic `clock`.
- Objects handed out (snapshots, returned intercepts) are shared with the state and frozen;
  callers must not mutate their lists and dicts. Inputs are copied (and type-checked) on entry,
  so a caller keeping a reference to what it passed in cannot change the state.

Cost per change, not per manager (issue 15: 1,000 agents and 200 clients on one core): sessions
and intercepts are also indexed by workload, by client session and by owner, so a call costs
what it touches, not a scan of everything held; and each change names its *topics*, the
watchers whose snapshot it can alter: `workload_topic(ns, name)` for the agents of a workload,
`session_topic(sid)` for a client's own intercepts and for a session that ended. An intercept's
change touches its workload and its client; a session's end touches that session. The manager
wakes only the watchers of the topics `changes()` returns, instead of every watcher re-encoding
its snapshot on every change.

One module on purpose (about 1,000 lines, half of them this docstring and the checks): the rules
between sessions, intercepts and reviews are one state machine whose invariants must be read
together.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from tpcontrol.names import AGENT_TTL, CLIENT_TTL
from tpproxy.routing import (
    DEFAULT_INTERCEPT_HEADER,
    HeaderRule,
    RuleError,
    ValueRule,
    check_rule_counts,
)
from tpproxy.specs import HeaderMatch, InterceptSpec, PathMatch
from tpproxy.wire import (
    AgentInfo,
    ClientInfo,
    Disposition,
    Intercept,
    InterceptRequest,
    Mechanism,
    Review,
    ReviewDisposition,
)

__all__ = [
    "WAITING_MESSAGE",
    "AgentInfo",
    "AlreadyExists",
    "ClientInfo",
    "Conflict",
    "Disposition",
    "Expired",
    "HeaderMatch",
    "Intercept",
    "InterceptRequest",
    "InvalidArgument",
    "ManagerState",
    "Mechanism",
    "NotFound",
    "PathMatch",
    "PermissionDenied",
    "Review",
    "ReviewDisposition",
    "StateError",
]


WAITING_MESSAGE = "Waiting for the agent"
MAX_PORT = 65535

# Intercept names end up in ids, URLs (`DELETE .../intercepts/{name}`) and file names.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NAME_MAX = 253
_PORT_IDENTIFIER = re.compile(r"(?:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)(?:/(?:TCP|UDP))?")
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_AGENT_SET: frozenset[str] = frozenset({"ACTIVE", "AGENT_ERROR", "BAD_ARGS"})
_AGENT_VISIBLE: frozenset[str] = frozenset({"WAITING", "ACTIVE", "AGENT_ERROR"})


# -- Errors -----------------------------------------------------------------------------------


class StateError(Exception):
    """A refused operation; `code` is the error kind as the JSON API reports it."""

    code = "state_error"


class NotFound(StateError):
    """A session or intercept that does not exist (or no longer does)."""

    code = "not_found"


class AlreadyExists(StateError):
    """An intercept with the same id (same client session, same name) exists."""

    code = "already_exists"


class Conflict(StateError):
    """An intercept that cannot share its port with an existing one; names both."""

    code = "conflict"


class InvalidArgument(StateError):
    """A request with a missing or malformed field; the message names the field."""

    code = "invalid_argument"


class PermissionDenied(StateError):
    """A session acting on something that is not its own (or a session of the wrong kind)."""

    code = "permission_denied"


class LimitExceeded(StateError):
    """More than the manager holds for anyone: the message names the limit."""

    code = "limit_exceeded"


# What one manager holds at most; each refusal names its limit.
MAX_SESSIONS = 10_000  # of clients; agents have a pool of their own, so clients cannot fill it
MAX_AGENT_SESSIONS = 10_000
MAX_SESSIONS_PER_OWNER = 64  # one identity's (a user's, a pod's) live sessions
MAX_INTERCEPTS_PER_SESSION = 64
MAX_INTERCEPTS_PER_OWNER = 256
MAX_INTERCEPTS = 5_000
MAX_ENVIRONMENT = 256 * 1024  # bytes of names and values an agent may hand out


@dataclass(frozen=True, slots=True)
class Expired:
    """What `expire` dropped: the session ids, and the intercepts removed with client sessions."""

    sessions: list[str] = field(default_factory=list)
    intercepts: list[Intercept] = field(default_factory=list)


# -- Internal records -------------------------------------------------------------------------


@dataclass(slots=True)
class _Session:
    info: ClientInfo | AgentInfo
    last_seen: float
    owner: str = ""  # the identity it is bound to (`auth.Identity.key`); "" unbound

    @property
    def is_agent(self) -> bool:
        return isinstance(self.info, AgentInfo)


@dataclass(slots=True)
class _Entry:
    """An intercept plus what the manager needs and watchers do not."""

    intercept: Intercept
    waiting_since: float  # when it last started waiting for an agent (for NO_AGENT)
    reviewer: str = ""  # identity of the pod whose review made it ACTIVE/AGENT_ERROR/BAD_ARGS
    rule_key: tuple[object, ...] = ()  # http intercepts: what makes two of them identical


def _identity(session_id: str, info: AgentInfo) -> str:
    """The pod an agent session speaks for: its pod name, else the session itself."""
    return f"pod:{info.pod_name}" if info.pod_name else f"session:{session_id}"


Topic = tuple[str, str, str]  # which watchers a change concerns; see the module docstring


def workload_topic(namespace: str, workload: str) -> Topic:
    """The agents of a workload: its intercepts (any of them) changed."""
    return ("workload", namespace, workload)


def session_topic(session_id: str) -> Topic:
    """One session: it ended, or (a client's) one of its own intercepts changed."""
    return ("session", session_id, "")


_S = TypeVar("_S", bound=msgspec.Struct)


def _checked(value: _S, kind: type[_S], what: str) -> _S:
    """A private, type-checked copy of a struct the caller built (constructors do not check)."""
    if not isinstance(value, kind):
        raise InvalidArgument(f"{what}: expected {kind.__name__}, got {type(value).__name__}")
    try:
        return msgspec.convert(msgspec.to_builtins(value), kind)
    except (msgspec.ValidationError, TypeError) as exc:
        raise InvalidArgument(f"{what}: {exc}") from None


def _q(text: str) -> str:
    """A value quoted for a message: double quotes, as in `intercept "alice:echo" not found`."""
    return json.dumps(text, ensure_ascii=False)


def _require(field_name: str, value: str) -> None:
    if not value.strip():
        raise InvalidArgument(f"{field_name} must not be empty")


def _check_environment(field_name: str, env: dict[str, str]) -> None:
    size = sum(len(k) + len(v) for k, v in env.items())
    if size > MAX_ENVIRONMENT:
        raise InvalidArgument(
            f"{field_name}: {size} bytes of names and values; at most {MAX_ENVIRONMENT}"
        )


def _port(field_name: str, value: int) -> None:
    if isinstance(value, bool) or not 1 <= value <= MAX_PORT:
        raise InvalidArgument(f"{field_name} must be a port number (1-65535), got {value!r}")


def _rule_key(intercept_id: str, req: InterceptRequest) -> tuple[object, ...]:
    """What the agent's route table compares (stricter: headers as a set); validates the rules.

    The rules are compiled with `tpproxy.routing`'s own constructors, so anything accepted here
    loads in the agent, and errors name the field (`headers[1]`, `path`, `methods[0]`).
    """
    try:
        check_rule_counts(len(req.headers), len(req.methods), "")
        headers = [
            HeaderRule.make(h.name, h.op, h.value, f"headers[{i}]")
            for i, h in enumerate(req.headers)
        ]
        path = ValueRule.make(req.path.op, req.path.value, "path") if req.path else None
    except RuleError as exc:
        raise InvalidArgument(str(exc)) from None
    if path is not None and path.op != "regex" and not path.value.startswith("/"):
        raise InvalidArgument(f"path: {path.op} path {_q(path.value)} must start with '/'")
    for i, method in enumerate(req.methods):
        if not _METHOD.fullmatch(method):
            raise InvalidArgument(f"methods[{i}]: {_q(method)} is not an HTTP method")
    header_set = frozenset((h.name, h.rule.op, h.rule.value) for h in headers)
    methods = frozenset(m.upper() for m in req.methods)
    if not header_set and path is None and not methods:
        header_set = frozenset({(DEFAULT_INTERCEPT_HEADER, "exact", intercept_id)})
    return (
        header_set,
        (path.op, path.value) if path else None,
        methods or None,
    )


def _describe_rules(key: tuple[object, ...]) -> str:
    headers, path, methods = key
    assert isinstance(headers, frozenset)
    parts = [f"header({n}) {op} {v!r}" for n, op, v in sorted(headers)]
    if isinstance(path, tuple):
        parts.append(f"path {path[0]} {path[1]!r}")
    if isinstance(methods, frozenset):
        parts.append(f"method in {sorted(methods)}")
    return " and ".join(parts)


def _validate_request(req: InterceptRequest) -> None:
    """Field checks (InvalidArgument naming the field) that do not need the intercept id."""
    _require("name", req.name)
    if len(req.name) > _NAME_MAX or not _NAME.fullmatch(req.name):
        raise InvalidArgument(
            f"name: {_q(req.name)} must be letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit, at most {_NAME_MAX} characters"
        )
    _require("workload", req.workload)
    _require("namespace", req.namespace)
    _require("mechanism", req.mechanism)
    _require("serviceName", req.service_name)
    ident = req.service_port_identifier
    if ident:
        number = ident.split("/", 1)[0]
        if not _PORT_IDENTIFIER.fullmatch(ident) or (
            number.isdigit() and not 1 <= int(number) <= MAX_PORT
        ):
            raise InvalidArgument(
                f"servicePortIdentifier: {_q(ident)} must be a port name or number, "
                "optionally followed by /TCP or /UDP"
            )
    _port("containerPort", req.container_port)
    _port("agentPort", req.agent_port)
    _require("targetHost", req.target_host)
    _port("targetPort", req.target_port)
    if req.mechanism == "tcp":
        for name, present in (
            ("headers", bool(req.headers)),
            ("path", req.path is not None),
            ("methods", bool(req.methods)),
            ("fallbackToApp", req.fallback_to_app),
        ):
            if present:
                raise InvalidArgument(f"{name}: only the http mechanism takes {name}")


def _same_port(a: InterceptRequest, b: InterceptRequest) -> bool:
    return a.container_port == b.container_port or a.agent_port == b.agent_port


def _where(req: InterceptRequest) -> str:
    return (
        f"container port {req.container_port} (agent port {req.agent_port}) "
        f"of {req.workload}.{req.namespace}"
    )


# -- The state --------------------------------------------------------------------------------


class ManagerState:
    """Sessions and intercepts of one traffic-manager; see the module docstring for the rules.

    `clock` (monotonic seconds) drives TTLs and the NO_AGENT timeout; tests pass a fake one.
    `version` grows by one for every call that changed something; `on_change` (if set) is called
    after such a call, when the state is consistent again. `changes()` names the topics changed
    since it was last called (the first call starts the record, so a state nobody asks keeps
    none).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        agent_ttl: float = AGENT_TTL,
        client_ttl: float = CLIENT_TTL,
        no_agent_timeout: float = 60.0,
        *,
        wall_clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        self.agent_ttl = agent_ttl
        self.client_ttl = client_ttl
        self.no_agent_timeout = no_agent_timeout
        self.on_change = on_change
        self._version = 0
        self._dirty = False
        self._sessions: dict[str, _Session] = {}
        self._intercepts: dict[str, _Entry] = {}
        # Indexes of the two above, kept by the few methods that add and remove (so that no
        # call scans every session or intercept): dicts, so each keeps insertion order.
        self._agents: dict[tuple[str, str], dict[str, AgentInfo]] = {}  # (ns, name) -> sid: info
        self._by_workload: dict[tuple[str, str], dict[str, _Entry]] = {}  # (ns, workload) -> id
        self._by_client: dict[str, dict[str, _Entry]] = {}  # client session -> id: entry
        self._by_owner: dict[str, set[str]] = {}  # owner -> its live session ids
        self._agent_count = 0
        self._touched: set[Topic] = set()  # by the call in progress
        self._changed: set[Topic] | None = None  # since the last `changes()`, once asked

    @property
    def version(self) -> int:
        """Grows on every change; watchers keep the last value they saw and compare."""
        return self._version

    # -- change bookkeeping -------------------------------------------------------------------

    def _mark(self) -> None:
        self._dirty = True

    def _commit(self) -> None:
        """End of a public mutating call: one version step however many things changed."""
        if self._dirty:
            self._dirty = False
            self._version += 1
            if self._changed is not None:
                self._changed |= self._touched
            self._touched.clear()
            if self.on_change is not None:
                self.on_change()

    def changes(self) -> set[Topic]:
        """The topics changed since the previous call: whose watchers must look again. The
        first call returns nothing and starts the record."""
        taken, self._changed = self._changed or set(), set()
        return taken

    def _touch(self, entry: _Entry) -> None:
        """An intercept changed, appeared or went: its workload's agents and its client see it."""
        spec = entry.intercept.spec
        self._touched.add(workload_topic(spec.namespace, spec.workload))
        self._touched.add(session_topic(entry.intercept.client_session))
        self._mark()

    def _set(self, entry: _Entry, **changes: object) -> None:
        """Replace the intercept with changed fields, marking a change only if one happened."""
        current = entry.intercept
        if all(getattr(current, k) == v for k, v in changes.items()):
            return
        entry.intercept = msgspec.structs.replace(current, **changes)
        self._touch(entry)

    def _to_waiting(self, entry: _Entry, message: str) -> None:
        now = self.clock()
        self._set(
            entry,
            disposition="WAITING",
            message=message,
            pod_ip="",
            mechanism_desc="",
            mount_point="",
        )
        entry.reviewer = ""
        entry.waiting_since = now

    # -- sessions -----------------------------------------------------------------------------

    def _new_session(self, info: ClientInfo | AgentInfo, owner: str) -> str:
        agent = isinstance(info, AgentInfo)
        held = self._agent_count if agent else len(self._sessions) - self._agent_count
        limit = MAX_AGENT_SESSIONS if agent else MAX_SESSIONS
        if held >= limit:
            raise LimitExceeded(
                f"{'agent ' if agent else ''}sessions: the manager holds {held}, its limit "
                f"({limit}); expired sessions are dropped after their TTL"
            )
        if owner:
            mine = len(self._by_owner.get(owner, ()))
            if mine >= MAX_SESSIONS_PER_OWNER:
                raise LimitExceeded(
                    f"sessions per identity: this identity holds {mine}, the limit "
                    f"({MAX_SESSIONS_PER_OWNER}); end some (or wait for their TTL)"
                )
        while True:
            session_id = secrets.token_urlsafe(16)
            if session_id not in self._sessions:
                break
        self._sessions[session_id] = _Session(info, self.clock(), owner)
        self._by_owner.setdefault(owner, set()).add(session_id)
        if isinstance(info, AgentInfo):
            self._agents.setdefault((info.namespace, info.name), {})[session_id] = info
            self._agent_count += 1
        self._mark()
        return session_id

    def arrive_client(self, info: ClientInfo, owner: str = "") -> str:
        """Open a client session bound to `owner`; returns its id (unguessable)."""
        info = _checked(info, ClientInfo, "client")
        _require("name", info.name)
        session_id = self._new_session(info, owner)
        self._commit()
        return session_id

    def arrive_agent(self, info: AgentInfo, owner: str = "") -> str:
        """Open an agent session; intercepts of its workload waiting for an agent are rechecked.

        The agent needs a name (its workload), a namespace and at least one mechanism.
        """
        info = _checked(info, AgentInfo, "agent")
        _require("name", info.name)
        _require("namespace", info.namespace)
        if not info.mechanisms:
            raise InvalidArgument("mechanisms must name at least one mechanism")
        _check_environment("environment", info.environment)
        for i, mechanism in enumerate(info.mechanisms):
            _require(f"mechanisms[{i}]", mechanism)
        if info.pod_ip:
            try:
                ipaddress.ip_address(info.pod_ip)
            except ValueError:
                raise InvalidArgument(f"podIp: {_q(info.pod_ip)} is not an IP address") from None
        session_id = self._new_session(info, owner)
        self._recheck(info.namespace, info.name)
        self._commit()
        return session_id

    def is_agent(self, session_id: str) -> bool:
        """Whether `session_id` is a live agent session (False for clients and unknown ids)."""
        session = self._sessions.get(session_id)
        return session is not None and session.is_agent

    def agent_info(self, session_id: str) -> AgentInfo | None:
        """What a live agent session said of itself (None for clients and unknown ids)."""
        session = self._sessions.get(session_id)
        return session.info if session is not None and isinstance(session.info, AgentInfo) else None

    def owner(self, session_id: str) -> tuple[str, bool]:
        """The identity a live session is bound to, and whether it is an agent's."""
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"session {_q(session_id)} not found")
        return session.owner, session.is_agent

    def is_client(self, session_id: str) -> bool:
        """Whether `session_id` is a live client session."""
        session = self._sessions.get(session_id)
        return session is not None and not session.is_agent

    def remain(self, session_id: str) -> None:
        """Heartbeat: the session lives for another TTL. Not a change (version unchanged)."""
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"session {_q(session_id)} not found")
        session.last_seen = self.clock()

    def depart(self, session_id: str) -> list[Intercept]:
        """End a session; returns the intercepts removed with it (a client's, as REMOVED)."""
        if session_id not in self._sessions:
            raise NotFound(f"session {_q(session_id)} not found")
        removed = self._drop_session(session_id, "client session departed")
        self._commit()
        return removed

    def expire(self) -> Expired:
        """Drop sessions not heard from for longer than their TTL, as if they had departed."""
        now = self.clock()
        gone = [
            sid
            for sid, s in self._sessions.items()
            if now - s.last_seen > (self.agent_ttl if s.is_agent else self.client_ttl)
        ]
        removed: list[Intercept] = []
        for sid in gone:
            removed.extend(self._drop_session(sid, "client session expired"))
        self._commit()
        return Expired(gone, removed)

    def _drop_session(self, session_id: str, why: str) -> list[Intercept]:
        session = self._sessions.pop(session_id)
        _discard(self._by_owner, session.owner, session_id)
        self._touched.add(session_topic(session_id))
        self._mark()
        info = session.info
        if isinstance(info, AgentInfo):
            _discard(self._agents, (info.namespace, info.name), session_id)
            self._agent_count -= 1
            self._recheck(info.namespace, info.name, departed=True)
            return []
        owned = list(self._by_client.get(session_id, ()))
        return [self._remove(iid, f"Removed: {why}") for iid in sorted(owned)]

    def _client(self, session_id: str) -> tuple[str, ClientInfo]:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"client session {_q(session_id)} not found")
        if not isinstance(session.info, ClientInfo):
            raise PermissionDenied(f"session {_q(session_id)} is an agent session, not a client's")
        return session_id, session.info

    def _agent(self, session_id: str) -> AgentInfo:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"agent session {_q(session_id)} not found")
        if not isinstance(session.info, AgentInfo):
            raise PermissionDenied(f"session {_q(session_id)} is a client session, not an agent's")
        return session.info

    def _agent_sessions(self, namespace: str, workload: str) -> list[tuple[str, AgentInfo]]:
        found = list(self._agents.get((namespace, workload), {}).items())
        found.sort(key=lambda pair: (pair[1].pod_name, pair[0]))
        return found

    def agents_of(self, namespace: str, workload: str) -> list[AgentInfo]:
        """The agents (one per session) serving a workload, sorted by pod name."""
        return [info for _, info in self._agent_sessions(namespace, workload)]

    def agent_environment(self, namespace: str, workload: str) -> dict[str, str]:
        """The app environment an agent of the workload reported (first pod by name), or {}."""
        agents = self.agents_of(namespace, workload)
        return dict(agents[0].environment) if agents else {}

    # -- agent checks -------------------------------------------------------------------------

    def _recheck(self, namespace: str, workload: str, *, departed: bool = False) -> None:
        """Spec 6.1's agent checks for one workload, run on create, arrival and departure.

        They never touch BAD_ARGS (an agent's verdict on the arguments) and take precedence
        over AGENT_ERROR.
        """
        agents = self._agent_sessions(namespace, workload)
        pods = {_identity(sid, info) for sid, info in agents}
        mechanisms = {m for _, info in agents for m in info.mechanisms}
        for entry in self._entries_of(namespace, workload):
            icept = entry.intercept
            state = icept.disposition
            if state == "BAD_ARGS":
                continue
            if not agents:
                if state in ("ACTIVE", "AGENT_ERROR", "NO_MECHANISM") or (
                    departed and state == "WAITING"
                ):
                    self._to_waiting(
                        entry,
                        f'{WAITING_MESSAGE}: no agent of "{workload}" in namespace '
                        f'"{namespace}" is connected',
                    )
                continue
            mechanism = icept.spec.mechanism
            if mechanism not in mechanisms:
                self._set(
                    entry,
                    disposition="NO_MECHANISM",
                    message=f'Agents for "{workload}" in namespace "{namespace}" do not have '
                    f'mechanism "{mechanism}"',
                    pod_ip="",
                    mechanism_desc="",
                    mount_point="",
                )
                entry.reviewer = ""
            elif state in ("NO_AGENT", "NO_MECHANISM"):
                self._to_waiting(entry, WAITING_MESSAGE)
            elif state in ("ACTIVE", "AGENT_ERROR") and entry.reviewer not in pods:
                self._to_waiting(entry, f"{WAITING_MESSAGE}: the pod that served it left")

    def check_waiting(self) -> list[Intercept]:
        """WAITING intercepts whose workload has had no agent for `no_agent_timeout` → NO_AGENT.

        Returns the intercepts changed. They stay listed: the client decides to leave.
        """
        now = self.clock()
        changed = []
        for entry in self._intercepts.values():
            icept = entry.intercept
            if icept.disposition != "WAITING" or now - entry.waiting_since <= self.no_agent_timeout:
                continue
            spec = icept.spec
            if self._agent_sessions(spec.namespace, spec.workload):
                continue
            self._set(
                entry,
                disposition="NO_AGENT",
                message=f'No agent found for "{spec.workload}" in namespace "{spec.namespace}" '
                f"within {self.no_agent_timeout:g}s",
            )
            changed.append(entry.intercept)
        self._commit()
        return changed

    # -- intercepts ---------------------------------------------------------------------------

    def _entries_of(self, namespace: str, workload: str) -> list[_Entry]:
        """The workload's intercepts, in creation order (as `_intercepts` holds them)."""
        return list(self._by_workload.get((namespace, workload), {}).values())

    def create_intercept(self, client_session: str, request: InterceptRequest) -> Intercept:
        """CreateIntercept: validate, refuse duplicates and conflicts, then WAITING.

        Errors in this order: the client session (NotFound), a field (InvalidArgument naming
        it), the id (AlreadyExists), the port (Conflict naming both intercepts).
        """
        session_id, client = self._client(client_session)
        req = _checked(request, InterceptRequest, "intercept request")
        _validate_request(req)
        intercept_id = f"{session_id}:{req.name}"
        key = _rule_key(intercept_id, req) if req.mechanism == "http" else ()
        if intercept_id in self._intercepts:
            raise AlreadyExists(f"intercept {_q(intercept_id)} already exists")
        mine = len(self._by_client.get(session_id, ()))
        if mine >= MAX_INTERCEPTS_PER_SESSION:
            raise LimitExceeded(
                f"intercepts: this session has {mine}, the limit per session "
                f"({MAX_INTERCEPTS_PER_SESSION})"
            )
        owner = self._sessions[session_id].owner
        if owner:
            owned = self._by_owner.get(owner, set())
            theirs = sum(len(self._by_client.get(sid, ())) for sid in owned)
            if theirs >= MAX_INTERCEPTS_PER_OWNER:
                raise LimitExceeded(
                    f"intercepts per identity: this identity holds {theirs}, the limit "
                    f"({MAX_INTERCEPTS_PER_OWNER})"
                )
        if len(self._intercepts) >= MAX_INTERCEPTS:
            raise LimitExceeded(f"intercepts: the manager holds its limit ({MAX_INTERCEPTS})")
        self._check_conflicts(intercept_id, req, key)
        now = self.clock()
        entry = _Entry(
            Intercept(
                id=intercept_id,
                spec=req,
                client_session=session_id,
                client=client.name,
                disposition="WAITING",
                message=WAITING_MESSAGE,
                created_at=self.wall_clock(),
            ),
            waiting_since=now,
            rule_key=key,
        )
        self._intercepts[intercept_id] = entry
        self._by_workload.setdefault((req.namespace, req.workload), {})[intercept_id] = entry
        self._by_client.setdefault(session_id, {})[intercept_id] = entry
        self._touch(entry)
        self._recheck(req.namespace, req.workload)
        self._commit()
        return entry.intercept

    def _check_conflicts(self, new_id: str, req: InterceptRequest, key: tuple[object, ...]) -> None:
        for other in sorted(self._entries_of(req.namespace, req.workload), key=_by_id):
            theirs = other.intercept
            if not _same_port(req, theirs.spec):
                continue
            head = (
                f"intercept {_q(new_id)} conflicts with intercept {_q(theirs.id)} "
                f"of client {_q(theirs.client)}"
            )
            if req.mechanism == "tcp":
                raise Conflict(
                    f"{head}: a tcp intercept takes the whole port, and {_where(req)} "
                    "is already intercepted"
                )
            if theirs.spec.mechanism == "tcp":
                raise Conflict(f"{head}: it is a tcp intercept and takes the whole {_where(req)}")
            if other.rule_key == key:
                raise Conflict(
                    f"{head}: identical http rules ({_describe_rules(key)}) on {_where(req)}"
                )

    def _remove(self, intercept_id: str, message: str) -> Intercept:
        entry = self._intercepts.pop(intercept_id)
        spec = entry.intercept.spec
        _discard(self._by_workload, (spec.namespace, spec.workload), intercept_id)
        _discard(self._by_client, entry.intercept.client_session, intercept_id)
        self._touch(entry)
        return msgspec.structs.replace(entry.intercept, disposition="REMOVED", message=message)

    def remove_intercept(self, client_session: str, name: str) -> Intercept:
        """RemoveIntercept: a client removes its own intercept, named by name.

        The id is built from the caller's own session, so a client cannot name another's
        intercept this way. Returns the removed intercept (disposition REMOVED).
        """
        session_id, _ = self._client(client_session)
        intercept_id = f"{session_id}:{name}"
        if intercept_id not in self._intercepts:
            raise NotFound(f"intercept {_q(intercept_id)} not found")
        removed = self._remove(intercept_id, "Removed by the client")
        self._commit()
        return removed

    def revoke(self, intercept_id: str, why: str) -> Intercept:
        """Remove an intercept whose owner lost the right to it (the manager re-checks)."""
        if intercept_id not in self._intercepts:
            raise NotFound(f"intercept {_q(intercept_id)} not found")
        removed = self._remove(intercept_id, why)
        self._commit()
        return removed

    def remove_intercept_by_id(self, client_session: str, intercept_id: str) -> Intercept:
        """Remove by full id; another client's intercept is refused with PermissionDenied."""
        session_id, _ = self._client(client_session)
        entry = self._intercepts.get(intercept_id)
        if entry is None:
            raise NotFound(f"intercept {_q(intercept_id)} not found")
        if entry.intercept.client_session != session_id:
            raise PermissionDenied(
                f"intercept {_q(intercept_id)} belongs to client {_q(entry.intercept.client)}; "
                "only its owner may remove it"
            )
        removed = self._remove(intercept_id, "Removed by the client")
        self._commit()
        return removed

    def review(self, agent_session: str, intercept_id: str, review: Review) -> bool:
        """ReviewIntercept: an agent's verdict. Returns whether it was applied.

        Applied when the intercept is WAITING (the first review wins), or when it comes from the
        pod whose review is in force (so an agent re-applying after a reconnect can move
        ACTIVE → AGENT_ERROR and back). Other reviews, e.g. from a second replica, are ignored,
        as are reviews of an intercept whose mechanism the agent does not advertise. Empty
        `podIp` / `environment` in the review are filled from the agent's own info.
        """
        agent = self._agent(agent_session)
        entry = self._intercepts.get(intercept_id)
        if entry is None:
            raise NotFound(f"intercept {_q(intercept_id)} not found")
        spec = entry.intercept.spec
        if (agent.name, agent.namespace) != (spec.workload, spec.namespace):
            raise PermissionDenied(
                f"agent {agent.name}.{agent.namespace} may not review intercept "
                f"{_q(intercept_id)} of {spec.workload}.{spec.namespace}"
            )
        review = _checked(review, Review, "review")
        _check_environment("environment", review.environment)
        if review.pod_ip:
            try:
                ipaddress.ip_address(review.pod_ip)
            except ValueError:
                raise InvalidArgument(f"podIp: {_q(review.pod_ip)} is not an IP address") from None
        if review.disposition not in _AGENT_SET:
            raise InvalidArgument(
                f"disposition: agents review with ACTIVE, AGENT_ERROR or BAD_ARGS, "
                f"not {_q(review.disposition)}"
            )
        pod = _identity(agent_session, agent)
        state = entry.intercept.disposition
        applies = state == "WAITING" or (state in _AGENT_SET and entry.reviewer == pod)
        if not applies or spec.mechanism not in agent.mechanisms:
            return False
        entry.reviewer = pod
        self._set(
            entry,
            disposition=review.disposition,
            message=review.message,
            pod_ip=agent.pod_ip or review.pod_ip,  # a verified agent's is its pod's own
            environment=dict(review.environment or agent.environment),
            mechanism_desc=review.mechanism_desc,
            mount_point=review.mount_point if review.disposition == "ACTIVE" else "",
        )
        self._commit()
        return True

    # -- snapshots ----------------------------------------------------------------------------

    def intercepts_for_client(self, session_id: str) -> list[Intercept]:
        """The client's own intercepts, sorted by id."""
        self._client(session_id)
        return sorted(
            (e.intercept for e in self._by_client.get(session_id, {}).values()), key=_icept_id
        )

    def intercepts_for_agent(self, session_id: str) -> list[Intercept]:
        """The agent's workload's intercepts in WAITING, ACTIVE or AGENT_ERROR, sorted by id."""
        agent = self._agent(session_id)
        return sorted(
            (
                e.intercept
                for e in self._entries_of(agent.namespace, agent.name)
                if e.intercept.disposition in _AGENT_VISIBLE
            ),
            key=_icept_id,
        )

    def all_intercepts(self) -> list[Intercept]:
        """Every intercept, sorted by id."""
        return sorted((e.intercept for e in self._intercepts.values()), key=_icept_id)

    def to_agent_specs(self, agent_session: str) -> list[InterceptSpec]:
        """The route specs the agent should apply: its WAITING and ACTIVE intercepts, by id.

        Only mechanisms the agent advertises. The target is the connector `tunnel:<id>`, which
        the agent maps to a tunnel through the manager. An http intercept without rules keeps
        them empty: the agent's loader then applies the default `x-telepresence-intercept-id`
        rule, exactly as the manager assumed when it checked for conflicts.
        """
        agent = self._agent(agent_session)
        specs = []
        for entry in sorted(self._entries_of(agent.namespace, agent.name), key=_by_id):
            icept = entry.intercept
            req = icept.spec
            if (
                icept.disposition not in ("WAITING", "ACTIVE")
                or req.mechanism not in agent.mechanisms
            ):
                continue
            specs.append(
                InterceptSpec(
                    id=icept.id,
                    port=req.agent_port,
                    target=f"tunnel:{icept.id}",
                    mechanism=req.mechanism,
                    headers=tuple(req.headers),
                    path=req.path,
                    methods=tuple(m.upper() for m in req.methods),
                    fallback_to_app=req.fallback_to_app,
                )
            )
        return specs


_K = TypeVar("_K")


def _discard(index: dict[_K, Any], key: _K, item: str) -> None:
    """Remove `item` from the set or dict at `index[key]`, and the key once it is empty."""
    held = index.get(key)
    if held is None:
        return
    if isinstance(held, set):
        held.discard(item)
    else:
        held.pop(item, None)
    if not held:
        del index[key]


def _by_id(entry: _Entry) -> str:
    return entry.intercept.id


def _icept_id(intercept: Intercept) -> str:
    return intercept.id
