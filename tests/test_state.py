"""The traffic-manager's in-memory state (tpcontrol.manager.state): sessions, intercepts, their rules.

Time is a fake clock, a `list[float]` the tests advance (`now[0] += 15`), injected as
`ManagerState(clock=...)`: it replaces time so that TTLs and the NO_AGENT timeout are tested at
their exact boundaries without sleeping.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tpcontrol.manager.state import (
    WAITING_MESSAGE,
    AgentInfo,
    AlreadyExists,
    ClientInfo,
    Conflict,
    HeaderMatch,
    Intercept,
    InterceptRequest,
    InvalidArgument,
    LimitExceeded,
    ManagerState,
    NotFound,
    PathMatch,
    PermissionDenied,
    Review,
    StateError,
)
from tpcontrol.names import CLIENT_TTL
from tpproxy.routing import PortRoutes
from tpproxy.specs import InterceptSpec, build_routes
from tpproxy.targets import Address

WALL = 1_750_000_000.0


@pytest.fixture
def now() -> list[float]:
    return [100.0]


@pytest.fixture
def state(now: list[float]) -> ManagerState:
    return ManagerState(clock=lambda: now[0], wall_clock=lambda: WALL)


def client(state: ManagerState, name: str = "alice") -> str:
    return state.arrive_client(ClientInfo(name=name, version="0.1.0"))


def agent(
    state: ManagerState,
    workload: str = "echo",
    namespace: str = "default",
    pod: str = "echo-1",
    ip: str = "10.0.0.1",
    mechanisms: tuple[str, ...] = ("tcp", "http"),
    environment: dict[str, str] | None = None,
) -> str:
    return state.arrive_agent(
        AgentInfo(
            name=workload,
            namespace=namespace,
            pod_name=pod,
            pod_ip=ip,
            version="0.1.0",
            mechanisms=list(mechanisms),
            environment=environment or {},
        )
    )


def req(name: str = "echo", mechanism: str = "tcp", **fields: Any) -> InterceptRequest:
    values: dict[str, Any] = {
        "name": name,
        "workload": "echo",
        "namespace": "default",
        "mechanism": mechanism,
        "service_name": "echo",
        "service_port_identifier": "http",
        "container_port": 8080,
        "agent_port": 9900,
        "target_port": 8080,
    }
    values.update(fields)
    return InterceptRequest(**values)


def http(name: str, *headers: tuple[str, str, str], **fields: Any) -> InterceptRequest:
    """An http request with header rules given as (name, op, value)."""
    rules = [HeaderMatch(n, v, op) for n, op, v in headers]  # type: ignore[arg-type]
    return req(name, "http", headers=rules, **fields)


def only(state: ManagerState) -> Intercept:
    (icept,) = state.all_intercepts()
    return icept


# -- sessions ---------------------------------------------------------------------------------


def test_session_ids_are_distinct_unguessable_and_typed(state: ManagerState) -> None:
    ids = {client(state, f"c{i}") for i in range(50)}
    assert len(ids) == 50
    assert all(len(sid) >= 20 and ":" not in sid for sid in ids)
    a = agent(state)
    c = next(iter(ids))
    assert state.is_agent(a)
    assert not state.is_client(a)
    assert state.is_client(c)
    assert not state.is_agent(c)
    assert not state.is_agent("nope")
    assert not state.is_client("nope")


def test_client_ttl_boundary_and_remain(state: ManagerState, now: list[float]) -> None:
    c = client(state)
    now[0] += CLIENT_TTL  # exactly the TTL (one place: tpcontrol.names): still alive
    assert state.expire().sessions == []
    state.remain(c)
    now[0] += CLIENT_TTL - 1  # the heartbeat restarted the TTL
    assert state.expire().sessions == []
    now[0] += 1.5
    assert state.expire().sessions == [c]
    with pytest.raises(NotFound, match=f'session "{c}" not found'):
        state.remain(c)


def test_agent_ttl_boundary_and_remain(state: ManagerState, now: list[float]) -> None:
    a = agent(state)
    c = client(state)
    now[0] += 10
    state.remain(a)
    now[0] += 15  # 15 s since the heartbeat: still alive
    assert state.expire().sessions == []
    assert state.agents_of("default", "echo") != []
    now[0] += 0.01
    expired = state.expire()
    assert expired.sessions == [a]
    assert state.agents_of("default", "echo") == []
    assert state.is_client(c)  # a client outlives an agent's TTL


def test_expire_of_a_client_removes_its_intercepts(state: ManagerState, now: list[float]) -> None:
    c = client(state)
    icept = state.create_intercept(c, req())
    now[0] += CLIENT_TTL + 1
    expired = state.expire()
    assert expired.sessions == [c]
    assert [(i.id, i.disposition) for i in expired.intercepts] == [(icept.id, "REMOVED")]
    assert state.all_intercepts() == []


def test_remain_and_depart_unknown_session(state: ManagerState) -> None:
    with pytest.raises(NotFound, match='session "ghost" not found') as info:
        state.remain("ghost")
    assert info.value.code == "not_found"
    with pytest.raises(NotFound, match='session "ghost" not found'):
        state.depart("ghost")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "name must not be empty"),
        ({"namespace": ""}, "namespace must not be empty"),
        ({"mechanisms": []}, "mechanisms must name at least one"),
        ({"mechanisms": ["tcp", ""]}, r"mechanisms\[1\] must not be empty"),
        ({"pod_ip": "10.0.0.300"}, 'podIp: "10.0.0.300" is not an IP address'),
        ({"mechanisms": "tcp"}, r"agent: .*\$\.mechanisms"),
    ],
)
def test_agent_arrival_validation(
    state: ManagerState, fields: dict[str, Any], message: str
) -> None:
    values: dict[str, Any] = {
        "name": "echo",
        "namespace": "default",
        "pod_name": "echo-1",
        "pod_ip": "10.0.0.1",
        "version": "1",
        "mechanisms": ["tcp"],
    }
    values.update(fields)
    with pytest.raises(InvalidArgument, match=message) as info:
        state.arrive_agent(AgentInfo(**values))
    assert info.value.code == "invalid_argument"
    assert state.version == 0  # nothing happened


def test_client_arrival_validation(state: ManagerState) -> None:
    with pytest.raises(InvalidArgument, match="name must not be empty"):
        state.arrive_client(ClientInfo(name=" ", version="1"))


# -- creating intercepts ----------------------------------------------------------------------


def test_create_starts_waiting_with_id_and_times(state: ManagerState) -> None:
    c = client(state)
    icept = state.create_intercept(c, req())
    assert icept.id == f"{c}:echo"
    assert (icept.disposition, icept.message) == ("WAITING", WAITING_MESSAGE)
    assert (icept.client, icept.client_session, icept.created_at) == ("alice", c, WALL)
    assert state.intercepts_for_client(c) == [icept]


def test_create_with_agent_present_stays_waiting_until_review(state: ManagerState) -> None:
    c = client(state)
    agent(state)
    assert state.create_intercept(c, req()).disposition == "WAITING"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "^name must not be empty$"),
        ({"name": "a/b"}, '^name: "a/b" must be letters'),
        ({"workload": ""}, "^workload must not be empty$"),
        ({"namespace": " "}, "^namespace must not be empty$"),
        ({"service_name": ""}, "^serviceName must not be empty$"),
        ({"service_port_identifier": "http/SCTP"}, '^servicePortIdentifier: "http/SCTP"'),
        ({"service_port_identifier": "70000"}, '^servicePortIdentifier: "70000"'),
        ({"container_port": 0}, r"^containerPort must be a port number \(1-65535\), got 0$"),
        ({"agent_port": 65536}, "^agentPort must be a port number"),
        ({"target_port": 0}, "^targetPort must be a port number"),
        ({"target_host": ""}, "^targetHost must not be empty$"),
        ({"mechanism": "udp"}, r"^intercept request: .*\$\.mechanism"),
        ({"container_port": "8080"}, r"^intercept request: .*\$\.containerPort"),
        ({"headers": [HeaderMatch("x-user", "alice")]}, "^headers: only the http mechanism"),
        ({"path": PathMatch("/")}, "^path: only the http mechanism"),
        ({"fallback_to_app": True}, "^fallbackToApp: only the http mechanism"),
    ],
)
def test_create_validation_names_the_field(
    state: ManagerState, fields: dict[str, Any], message: str
) -> None:
    c = client(state)
    version = state.version
    with pytest.raises(InvalidArgument, match=message):
        state.create_intercept(c, req(**fields))
    assert state.all_intercepts() == []
    assert state.version == version


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"headers": [HeaderMatch("x user", "a")]}, r"^headers\[0\]: 'x user' is not a valid"),
        (
            {"headers": [HeaderMatch("x-a", "a"), HeaderMatch("x-b", "(", "regex")]},
            r"^headers\[1\]: invalid regex",
        ),
        ({"path": PathMatch("api", "prefix")}, "^path: prefix path \"api\" must start with '/'"),
        ({"path": PathMatch("[", "regex")}, "^path: invalid regex"),
        ({"methods": ["GET", "BAD METHOD"]}, r'^methods\[1\]: "BAD METHOD" is not an HTTP method'),
        (
            {"headers": [HeaderMatch(f"x-{i}", "a") for i in range(17)]},
            "^headers: 17 rules; at most 16$",
        ),
        ({"methods": [f"M{i}" for i in range(17)]}, "^methods: 17 methods; at most 16$"),
        ({"headers": [HeaderMatch("x-a", "a" * 1025)]}, r"^headers\[0\]: value of 1025 char"),
        ({"path": PathMatch("/" * 2000)}, "^path: value of 2000 characters; at most 1024$"),
        (
            {"headers": [HeaderMatch("x-a", r"(a)\1", "regex")]},
            r"^headers\[0\]: invalid regex .*invalid escape sequence.*RE2 syntax",
        ),
        ({"path": PathMatch("(?=/a)", "regex")}, r"^path: invalid regex .*lookaround"),
    ],
)
def test_create_validation_of_http_rules(
    state: ManagerState, fields: dict[str, Any], message: str
) -> None:
    c = client(state)
    with pytest.raises(InvalidArgument, match=message):
        state.create_intercept(c, req(mechanism="http", **fields))


@pytest.mark.parametrize("ident", ["", "http", "8080", "http/TCP", "53/UDP", "grpc-web"])
def test_service_port_identifier_forms(state: ManagerState, ident: str) -> None:
    c = client(state)
    assert (
        state.create_intercept(c, req(service_port_identifier=ident)).spec.service_port_identifier
        == ident
    )


def test_create_needs_a_client_session(state: ManagerState) -> None:
    with pytest.raises(NotFound, match=r'^client session "nope" not found$'):
        state.create_intercept("nope", req())
    a = agent(state)
    with pytest.raises(PermissionDenied, match="is an agent session"):
        state.create_intercept(a, req())


def test_duplicate_name_per_client(state: ManagerState) -> None:
    alice, bob = client(state), client(state, "bob")
    first = state.create_intercept(alice, req())
    with pytest.raises(AlreadyExists, match=f'^intercept "{first.id}" already exists$') as info:
        state.create_intercept(alice, req(container_port=9090, agent_port=9901))
    assert info.value.code == "already_exists"
    # The same name is another id for another client.
    other = state.create_intercept(bob, req(container_port=9090, agent_port=9901))
    assert other.id == f"{bob}:echo"


def test_input_is_copied(state: ManagerState) -> None:
    c = client(state)
    request = http("mine", ("x-user", "exact", "alice"))
    state.create_intercept(c, request)
    request.headers.append(HeaderMatch("x-other", "1"))
    assert only(state).spec.headers == [HeaderMatch("x-user", "alice")]


# -- conflicts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (req("a"), req("b"), "a tcp intercept takes the whole port"),
        (http("a", ("x-user", "exact", "alice")), req("b"), "a tcp intercept takes the whole port"),
        (req("a"), http("b", ("x-user", "exact", "alice")), "it is a tcp intercept"),
        (req("a"), req("b", mechanism="http"), "it is a tcp intercept"),
    ],
)
def test_tcp_conflicts_with_anything_on_its_port(
    state: ManagerState, first: InterceptRequest, second: InterceptRequest, message: str
) -> None:
    alice, bob = client(state), client(state, "bob")
    existing = state.create_intercept(alice, first)
    with pytest.raises(Conflict, match=message) as info:
        state.create_intercept(bob, second)
    text = str(info.value)
    assert f'intercept "{bob}:b"' in text
    assert f'intercept "{existing.id}"' in text
    assert 'client "alice"' in text
    assert "container port 8080 (agent port 9900) of echo.default" in text
    assert info.value.code == "conflict"
    assert [i.id for i in state.all_intercepts()] == [existing.id]


def test_same_agent_port_is_the_same_port(state: ManagerState) -> None:
    c = client(state)
    state.create_intercept(c, req("a"))
    with pytest.raises(Conflict):
        state.create_intercept(c, req("b", container_port=8081))  # agent port 9900 again
    with pytest.raises(Conflict):
        state.create_intercept(c, req("c", agent_port=9901))  # container port 8080 again


def test_identical_http_rules_conflict(state: ManagerState) -> None:
    alice, bob = client(state), client(state, "bob")
    first = state.create_intercept(
        alice,
        http(
            "a",
            ("X-User", "exact", "alice"),
            ("x-env", "prefix", "dev"),
            path=PathMatch("/api"),
            methods=["get", "POST"],
        ),
    )
    # Same rules: header names differ in case, order differs, a header repeated, methods' case.
    with pytest.raises(Conflict) as info:
        state.create_intercept(
            bob,
            http(
                "b",
                ("x-env", "prefix", "dev"),
                ("x-user", "exact", "alice"),
                ("x-user", "exact", "alice"),
                path=PathMatch("/api", "prefix"),
                methods=["POST", "GET"],
            ),
        )
    text = str(info.value)
    assert f'intercept "{bob}:b" conflicts with intercept "{first.id}"' in text
    assert "identical http rules" in text
    assert "header(x-user) exact 'alice'" in text


def test_rule_less_http_intercepts_use_the_default_rule(state: ManagerState) -> None:
    alice, bob = client(state), client(state, "bob")
    a = state.create_intercept(alice, req("a", "http"))
    state.create_intercept(bob, req("b", "http"))  # its default rule names its own id
    with pytest.raises(Conflict, match="identical http rules"):
        state.create_intercept(bob, http("c", ("X-Telepresence-Intercept-Id", "exact", a.id)))


@pytest.mark.parametrize(
    "second",
    [
        http("b", ("x-user", "exact", "bob")),
        http("b", ("x-user", "prefix", "alice")),
        http("b", ("x-user", "exact", "alice"), path=PathMatch("/")),
        http("b", ("x-user", "exact", "alice"), methods=["GET"]),
        http("b", ("x-user", "exact", "alice"), ("x-env", "exact", "dev")),
        req("b", "http"),
    ],
)
def test_different_http_rules_coexist_on_one_port(
    state: ManagerState, second: InterceptRequest
) -> None:
    alice, bob = client(state), client(state, "bob")
    state.create_intercept(alice, http("a", ("x-user", "exact", "alice")))
    state.create_intercept(bob, second)
    assert len(state.all_intercepts()) == 2


@pytest.mark.parametrize(
    "fields",
    [
        {"container_port": 8081, "agent_port": 9901},
        {"workload": "other"},
        {"namespace": "staging"},
    ],
)
def test_other_ports_and_workloads_do_not_conflict(
    state: ManagerState, fields: dict[str, Any]
) -> None:
    alice, bob = client(state), client(state, "bob")
    state.create_intercept(alice, req("a"))
    state.create_intercept(bob, req("b", **fields))
    assert len(state.all_intercepts()) == 2


def test_a_no_agent_intercept_still_claims_its_port_until_removed(
    state: ManagerState, now: list[float]
) -> None:
    alice, bob = client(state), client(state, "bob")
    state.create_intercept(alice, req("a"))
    now[0] += 61
    assert [i.disposition for i in state.check_waiting()] == ["NO_AGENT"]
    with pytest.raises(Conflict):
        state.create_intercept(bob, req("b"))
    state.remove_intercept(alice, "a")
    assert state.create_intercept(bob, req("b")).disposition == "WAITING"


# -- removal ----------------------------------------------------------------------------------


def test_remove_by_name_is_scoped_to_the_caller(state: ManagerState) -> None:
    alice, bob = client(state), client(state, "bob")
    icept = state.create_intercept(alice, req())
    with pytest.raises(NotFound, match=f'^intercept "{bob}:echo" not found$'):
        state.remove_intercept(bob, "echo")
    with pytest.raises(NotFound):
        state.remove_intercept(bob, icept.id)  # a name, not an id: "<bob>:<alice>:echo"
    removed = state.remove_intercept(alice, "echo")
    assert (removed.id, removed.disposition) == (icept.id, "REMOVED")
    assert state.all_intercepts() == []
    with pytest.raises(NotFound):
        state.remove_intercept(alice, "echo")


def test_remove_by_id_refuses_other_clients(state: ManagerState) -> None:
    alice, bob = client(state), client(state, "bob")
    icept = state.create_intercept(alice, req())
    with pytest.raises(PermissionDenied, match='belongs to client "alice"') as info:
        state.remove_intercept_by_id(bob, icept.id)
    assert info.value.code == "permission_denied"
    assert state.all_intercepts() == [icept]
    with pytest.raises(NotFound, match='intercept "x:y" not found'):
        state.remove_intercept_by_id(bob, "x:y")
    assert state.remove_intercept_by_id(alice, icept.id).disposition == "REMOVED"
    assert state.all_intercepts() == []


def test_departing_client_removes_only_its_intercepts(state: ManagerState) -> None:
    alice, bob = client(state), client(state, "bob")
    a1 = state.create_intercept(alice, req("a1"))
    a2 = state.create_intercept(alice, req("a2", container_port=9090, agent_port=9901))
    b = state.create_intercept(bob, req("b", container_port=7070, agent_port=9902))
    removed = state.depart(alice)
    assert sorted(i.id for i in removed) == sorted([a1.id, a2.id])
    assert {i.disposition for i in removed} == {"REMOVED"}
    assert state.all_intercepts() == [b]
    with pytest.raises(NotFound, match="client session"):
        state.intercepts_for_client(alice)


# -- reviews ----------------------------------------------------------------------------------


def test_review_rejects_the_wrong_agent_and_bad_input(state: ManagerState) -> None:
    c = client(state)
    icept = state.create_intercept(c, req())
    other_wl = agent(state, workload="other", pod="other-1")
    other_ns = agent(state, namespace="staging", pod="echo-s")
    for sid in (other_wl, other_ns):
        with pytest.raises(PermissionDenied, match=f'may not review intercept "{icept.id}"'):
            state.review(sid, icept.id, Review(disposition="ACTIVE"))
    with pytest.raises(NotFound, match='agent session "ghost" not found'):
        state.review("ghost", icept.id, Review(disposition="ACTIVE"))
    with pytest.raises(PermissionDenied, match="is a client session"):
        state.review(c, icept.id, Review(disposition="ACTIVE"))
    a = agent(state)
    with pytest.raises(NotFound, match='intercept "nope" not found'):
        state.review(a, "nope", Review(disposition="ACTIVE"))
    with pytest.raises(InvalidArgument, match="disposition"):
        state.review(a, icept.id, Review(disposition="WAITING"))  # type: ignore[arg-type]
    assert only(state).disposition == "WAITING"


def test_first_review_wins_and_copies_its_payload(state: ManagerState) -> None:
    c = client(state)
    icept = state.create_intercept(c, req())
    a = agent(state, pod="echo-1", ip="10.0.0.1")
    b = agent(state, pod="echo-2", ip="10.0.0.2")
    applied = state.review(
        a,
        icept.id,
        Review(
            disposition="ACTIVE",
            message="serving",
            pod_ip="10.0.0.9",
            environment={"A": "1"},
            mechanism_desc="all TCP connections",
        ),
    )
    assert applied
    got = only(state)
    # The pod IP is the agent's own (the manager takes it from the pod), not the review's.
    assert (got.disposition, got.message, got.pod_ip) == ("ACTIVE", "serving", "10.0.0.1")
    assert (got.environment, got.mechanism_desc) == ({"A": "1"}, "all TCP connections")
    # Another replica's review does not replace it.
    version = state.version
    assert not state.review(b, icept.id, Review(disposition="AGENT_ERROR", message="no"))
    assert only(state) == got
    assert state.version == version


def test_the_serving_pod_may_change_its_verdict(state: ManagerState) -> None:
    c = client(state)
    icept = state.create_intercept(c, req())
    a = agent(state, pod="echo-1", ip="10.0.0.1", environment={"APP": "x"})
    assert state.review(a, icept.id, Review(disposition="ACTIVE"))
    assert (only(state).pod_ip, only(state).environment) == ("10.0.0.1", {"APP": "x"})
    assert state.review(a, icept.id, Review(disposition="AGENT_ERROR", message="port busy"))
    assert (only(state).disposition, only(state).message) == ("AGENT_ERROR", "port busy")
    # The same pod after a reconnect (a new session) re-applies it.
    a2 = agent(state, pod="echo-1", ip="10.0.0.1")
    assert state.review(a2, icept.id, Review(disposition="ACTIVE"))
    assert only(state).disposition == "ACTIVE"
    # The old session expiring does not unseat the pod, which is still connected.
    state.depart(a)
    assert only(state).disposition == "ACTIVE"


def test_review_from_agent_without_the_mechanism_is_ignored(state: ManagerState) -> None:
    c = client(state)
    icept = state.create_intercept(c, req(mechanism="http"))
    agent(state, pod="echo-1", mechanisms=("tcp", "http"))
    tcp_only = agent(state, pod="echo-2", mechanisms=("tcp",))
    assert not state.review(tcp_only, icept.id, Review(disposition="ACTIVE"))
    assert only(state).disposition == "WAITING"


def test_serving_pod_leaving_puts_the_intercept_back_to_waiting(state: ManagerState) -> None:
    c = client(state)
    icept = state.create_intercept(c, req())
    a = agent(state, pod="echo-1", ip="10.0.0.1")
    b = agent(state, pod="echo-2", ip="10.0.0.2")
    state.review(a, icept.id, Review(disposition="ACTIVE"))
    state.depart(a)
    got = only(state)
    assert (got.disposition, got.pod_ip) == ("WAITING", "")
    assert state.review(b, icept.id, Review(disposition="ACTIVE"))
    assert only(state).pod_ip == "10.0.0.2"


def test_last_agent_leaving_restarts_the_wait(state: ManagerState, now: list[float]) -> None:
    c = client(state)
    icept = state.create_intercept(c, req())
    a = agent(state)
    state.review(a, icept.id, Review(disposition="ACTIVE"))
    now[0] += 3600  # long after creation
    state.depart(a)
    got = only(state)
    assert got.disposition == "WAITING"
    assert 'no agent of "echo"' in got.message
    assert state.check_waiting() == []  # the timer started at the departure
    now[0] += 60.5
    assert [i.disposition for i in state.check_waiting()] == ["NO_AGENT"]


def test_last_agent_leaving_restarts_the_wait_of_unreviewed_intercepts(
    state: ManagerState, now: list[float]
) -> None:
    c = client(state)
    a = agent(state)
    state.create_intercept(c, req())  # never reviewed
    now[0] += 3600
    state.depart(a)
    assert state.check_waiting() == []
    now[0] += 60.5
    assert [i.disposition for i in state.check_waiting()] == ["NO_AGENT"]


def test_agent_error_goes_back_to_waiting_when_agents_are_gone(state: ManagerState) -> None:
    c = client(state)
    icept = state.create_intercept(c, req())
    a = agent(state)
    state.review(a, icept.id, Review(disposition="AGENT_ERROR", message="conflict"))
    state.depart(a)
    assert only(state).disposition == "WAITING"


def test_bad_args_is_never_overwritten_by_the_manager(state: ManagerState) -> None:
    c = client(state)
    icept = state.create_intercept(c, req(mechanism="http"))
    a = agent(state)
    state.review(a, icept.id, Review(disposition="BAD_ARGS", message="bad header"))
    state.depart(a)  # no agent left: not back to WAITING
    agent(state, pod="echo-2", mechanisms=("tcp",))  # no agent with http: not NO_MECHANISM
    assert (only(state).disposition, only(state).message) == ("BAD_ARGS", "bad header")
    agent(state, pod="echo-3")
    assert (only(state).disposition, only(state).message) == ("BAD_ARGS", "bad header")


# -- NO_AGENT and NO_MECHANISM ----------------------------------------------------------------


def test_no_agent_after_the_timeout_and_not_before(state: ManagerState, now: list[float]) -> None:
    c = client(state)
    state.create_intercept(c, req())
    now[0] += 60.0  # exactly the timeout: not yet
    assert state.check_waiting() == []
    assert only(state).disposition == "WAITING"
    now[0] += 0.5
    (changed,) = state.check_waiting()
    assert changed.disposition == "NO_AGENT"
    assert changed.message == 'No agent found for "echo" in namespace "default" within 60s'
    assert only(state) == changed  # still listed
    assert state.check_waiting() == []
    # An agent arriving turns it back to WAITING.
    agent(state)
    assert (only(state).disposition, only(state).message) == ("WAITING", WAITING_MESSAGE)


def test_no_agent_not_set_while_an_agent_is_present(state: ManagerState, now: list[float]) -> None:
    c = client(state)
    agent(state)
    state.create_intercept(c, req())
    now[0] += 600
    assert state.check_waiting() == []
    assert only(state).disposition == "WAITING"


def test_no_mechanism_until_an_agent_has_it(state: ManagerState) -> None:
    c = client(state)
    agent(state, pod="echo-1", mechanisms=("tcp",))
    icept = state.create_intercept(c, req(mechanism="http"))
    assert icept.disposition == "NO_MECHANISM"
    assert icept.message == 'Agents for "echo" in namespace "default" do not have mechanism "http"'
    agent(state, pod="echo-2", mechanisms=("tcp", "http"))
    assert only(state).disposition == "WAITING"


# -- snapshots and agents ---------------------------------------------------------------------


def test_agent_snapshots_are_filtered_and_sorted(state: ManagerState) -> None:
    zed, amy = client(state, "zed"), client(state, "amy")
    a = agent(state, pod="echo-1")
    agent(state, workload="other", pod="other-1")
    agent(state, namespace="staging", pod="echo-s")
    i1 = state.create_intercept(zed, req("z1"))
    i2 = state.create_intercept(
        amy, http("a1", ("x-user", "exact", "amy"), container_port=9090, agent_port=9901)
    )
    i3 = state.create_intercept(
        amy, http("a2", ("x-user", "exact", "bob"), container_port=9090, agent_port=9901)
    )
    i4 = state.create_intercept(
        zed, http("z2", ("x", "exact", "1"), container_port=7070, agent_port=9902)
    )
    state.create_intercept(zed, req("elsewhere", workload="other"))
    state.create_intercept(zed, req("staged", namespace="staging"))
    state.review(a, i2.id, Review(disposition="ACTIVE"))
    state.review(a, i3.id, Review(disposition="AGENT_ERROR"))
    state.review(a, i4.id, Review(disposition="BAD_ARGS"))  # not shown to agents
    snapshot = state.intercepts_for_agent(a)
    assert [i.id for i in snapshot] == sorted([i1.id, i2.id, i3.id])
    assert [i.disposition for i in snapshot] == [
        {i1.id: "WAITING", i2.id: "ACTIVE", i3.id: "AGENT_ERROR"}[i.id] for i in snapshot
    ]
    mine = state.intercepts_for_client(zed)
    assert [i.id for i in mine] == sorted(f"{zed}:{n}" for n in ("z1", "z2", "elsewhere", "staged"))
    assert [i.id for i in state.all_intercepts()] == sorted(i.id for i in state.all_intercepts())
    with pytest.raises(NotFound, match='agent session "ghost"'):
        state.intercepts_for_agent("ghost")


def test_agents_of_and_environment(state: ManagerState) -> None:
    assert state.agents_of("default", "echo") == []
    assert state.agent_environment("default", "echo") == {}
    agent(state, pod="echo-b", environment={"POD": "b"})
    agent(state, pod="echo-a", environment={"POD": "a"})
    agent(state, workload="other", pod="other-1")
    assert [i.pod_name for i in state.agents_of("default", "echo")] == ["echo-a", "echo-b"]
    env = state.agent_environment("default", "echo")
    assert env == {"POD": "a"}
    env["POD"] = "changed"  # a copy
    assert state.agent_environment("default", "echo") == {"POD": "a"}


def test_to_agent_specs(state: ManagerState) -> None:
    alice, bob = client(state, "alice"), client(state, "bob")
    a = agent(state)
    tcp = state.create_intercept(alice, req("tcp", container_port=7070, agent_port=9902))
    ruled = state.create_intercept(
        alice,
        http(
            "ruled",
            ("X-User", "regex", "al.*"),
            path=PathMatch("/api", "prefix"),
            methods=["get"],
            fallback_to_app=True,
        ),
    )
    bare = state.create_intercept(bob, req("bare", "http"))
    failed = state.create_intercept(bob, http("failed", ("x-user", "exact", "z")))
    state.review(a, ruled.id, Review(disposition="ACTIVE"))
    state.review(a, failed.id, Review(disposition="AGENT_ERROR"))
    specs = {s.id: s for s in state.to_agent_specs(a)}
    assert list(specs) == sorted([tcp.id, ruled.id, bare.id])  # no AGENT_ERROR, sorted
    assert specs[tcp.id] == InterceptSpec(
        id=tcp.id, port=9902, target=f"tunnel:{tcp.id}", mechanism="tcp"
    )
    assert specs[ruled.id] == InterceptSpec(
        id=ruled.id,
        port=9900,
        target=f"tunnel:{ruled.id}",
        mechanism="http",
        headers=(HeaderMatch("X-User", "al.*", "regex"),),
        path=PathMatch("/api", "prefix"),
        methods=("GET",),
        fallback_to_app=True,
    )
    assert (specs[bare.id].headers, specs[bare.id].path, specs[bare.id].methods) == ((), None, ())
    # The agent can load them: its route table accepts them without a conflict and routes as
    # the manager promised (the rule-less one by Telepresence's default header).
    base = {
        9900: PortRoutes(Address("127.0.0.1", 8080), http=True),
        9902: PortRoutes(Address("127.0.0.1", 7070)),
    }
    connectors = {s.target: Address("127.0.0.1", 1000 + i) for i, s in enumerate(specs.values())}
    table = build_routes(base, list(specs.values()), connectors=connectors)
    assert table[9902].connection_route()[0] == tcp.id
    port = table[9900]
    assert port.decide("GET", "/api/x", {"x-user": ["alice"]}).route == ruled.id
    assert port.decide("GET", "/api/x", {"x-telepresence-intercept-id": [bare.id]}).route == bare.id
    assert port.decide("GET", "/api/x", {"x-user": ["bob"]}).route == "app"


def test_to_agent_specs_only_for_the_agents_mechanisms(state: ManagerState) -> None:
    c = client(state)
    full = agent(state, pod="echo-1")
    tcp_only = agent(state, pod="echo-2", mechanisms=("tcp",))
    state.create_intercept(c, req("h", "http"))
    state.create_intercept(c, req("t", container_port=7070, agent_port=9902))
    assert [s.mechanism for s in state.to_agent_specs(full)] == ["http", "tcp"]
    assert [s.mechanism for s in state.to_agent_specs(tcp_only)] == ["tcp"]


# -- versions ---------------------------------------------------------------------------------


def test_version_moves_on_every_change_and_only_then(state: ManagerState, now: list[float]) -> None:
    calls: list[int] = []
    state.on_change = lambda: calls.append(state.version)
    seen = [state.version]

    def changed() -> None:
        assert state.version == seen[-1] + 1
        seen.append(state.version)

    def unchanged() -> None:
        assert state.version == seen[-1]

    c = client(state)
    changed()
    a = agent(state)
    changed()
    state.remain(c)
    unchanged()
    icept = state.create_intercept(c, req())
    changed()
    with pytest.raises(StateError):
        state.create_intercept(c, req())
    unchanged()
    assert state.review(a, icept.id, Review(disposition="ACTIVE"))
    changed()
    assert state.review(a, icept.id, Review(disposition="ACTIVE"))  # the same verdict again
    unchanged()
    assert state.expire().sessions == []
    unchanged()
    assert state.check_waiting() == []
    unchanged()
    now[0] += 16
    assert state.expire().sessions == [a]  # the agent is gone: back to WAITING
    changed()
    assert only(state).disposition == "WAITING"
    now[0] += 61
    assert len(state.check_waiting()) == 1
    changed()
    state.remove_intercept(c, "echo")
    changed()
    state.depart(c)
    changed()
    assert calls == seen[1:]


def test_wire_form_is_camel_case(state: ManagerState) -> None:
    c = client(state)
    icept = state.create_intercept(c, http("w", ("x-user", "exact", "a"), fallback_to_app=True))
    data = msgspec.json.decode(msgspec.json.encode(icept))
    assert {"clientSession", "podIp", "mechanismDesc", "createdAt"} <= set(data)
    assert {"containerPort", "agentPort", "fallbackToApp", "servicePortIdentifier"} <= set(
        data["spec"]
    )
    assert msgspec.json.decode(msgspec.json.encode(icept), type=Intercept) == icept
    decoded = msgspec.json.decode(
        b'{"disposition": "ACTIVE", "podIp": "10.1.1.1", "mechanismDesc": "d"}', type=Review
    )
    assert (decoded.pod_ip, decoded.mechanism_desc) == ("10.1.1.1", "d")


def test_sessions_and_intercepts_stop_at_their_limits_with_the_limit_named(
    state: ManagerState,
) -> None:
    from tpcontrol.manager import state as st

    c = client(state)
    for i in range(st.MAX_INTERCEPTS_PER_SESSION):
        state.create_intercept(c, http(f"i{i}", ("x-dev", "exact", f"v{i}")))
    version = state.version
    with pytest.raises(LimitExceeded, match=r"^intercepts: this session has 64, the limit per"):
        state.create_intercept(c, http("one-more", ("x-dev", "exact", "more")))
    assert state.version == version  # nothing changed
    other = client(state, "bob")  # another session still may
    state.create_intercept(other, http("b", ("x-dev", "exact", "bob")))

    for _ in range(st.MAX_SESSIONS - 2):
        client(state, "crowd")
    with pytest.raises(LimitExceeded, match=r"^sessions: the manager holds 10000, its limit"):
        client(state, "late")
    assert len(state._sessions) == st.MAX_SESSIONS
