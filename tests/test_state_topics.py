"""The manager's state names, for every change, the watches whose snapshot it alters (the
manager wakes only those), and its indexes always equal a full recount of what it holds."""

from __future__ import annotations

import contextlib
import random
from typing import Literal

import pytest

from tpcontrol.manager import state as st
from tpcontrol.manager.state import AgentInfo, ClientInfo, InterceptRequest, ManagerState, Review

WORKLOADS = [("ns1", "a"), ("ns1", "b"), ("ns2", "a")]


def snapshots(s: ManagerState) -> dict[str, list[st.Intercept]]:
    return {
        sid: s.intercepts_for_agent(sid) if sess.is_agent else s.intercepts_for_client(sid)
        for sid, sess in s._sessions.items()
    }


def indexes_match_a_recount(s: ManagerState) -> None:
    agents: dict[tuple[str, str], dict[str, AgentInfo]] = {}
    owners: dict[str, set[str]] = {}
    for sid, sess in s._sessions.items():
        owners.setdefault(sess.owner, set()).add(sid)
        if isinstance(sess.info, AgentInfo):
            agents.setdefault((sess.info.namespace, sess.info.name), {})[sid] = sess.info
    assert agents == s._agents
    assert owners == s._by_owner
    assert s._agent_count == sum(1 for x in s._sessions.values() if x.is_agent)
    by_workload: dict[tuple[str, str], list[str]] = {}
    by_client: dict[str, set[str]] = {}
    for iid, e in s._intercepts.items():
        spec = e.intercept.spec
        by_workload.setdefault((spec.namespace, spec.workload), []).append(iid)
        by_client.setdefault(e.intercept.client_session, set()).add(iid)
    assert by_workload == {k: list(v) for k, v in s._by_workload.items()}  # creation order too
    assert by_client == {k: set(v) for k, v in s._by_client.items()}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_name_every_changed_watch_and_keep_the_indexes(seed: int) -> None:
    steps = 1500
    rng = random.Random(seed)
    now = [0.0]
    s = ManagerState(clock=lambda: now[0], no_agent_timeout=5, agent_ttl=15, client_ttl=60)
    assert s.changes() == set()  # the first call starts the record
    WL = WORKLOADS
    clients: list[str] = []
    agent_sids: list[str] = []
    changed_seen = 0
    for step in range(steps):
        before = snapshots(s)
        infos = {sid: (s._sessions[sid].info) for sid in s._sessions}
        op = rng.random()
        try:
            if op < 0.1:
                clients.append(
                    s.arrive_client(
                        ClientInfo(name=f"c{step}", version="1"), owner=f"u{rng.randrange(3)}"
                    )
                )
            elif op < 0.2:
                ns, wl = rng.choice(WL)
                mechs = ["tcp", "http"] if rng.random() < 0.8 else ["tcp"]
                agent_sids.append(
                    s.arrive_agent(
                        AgentInfo(
                            name=wl,
                            namespace=ns,
                            pod_name=f"p{rng.randrange(4)}",
                            pod_ip="",
                            version="1",
                            mechanisms=mechs,
                        ),
                        owner=f"pod{step}",
                    )
                )
            elif op < 0.45 and clients:
                ns, wl = rng.choice(WL)
                mech: Literal["tcp", "http"] = "http" if rng.random() < 0.66 else "tcp"
                port = rng.choice([8080, 8081])
                req = InterceptRequest(
                    name=f"i{rng.randrange(6)}",
                    workload=wl,
                    namespace=ns,
                    mechanism=mech,
                    service_name="svc",
                    container_port=port,
                    agent_port=port + 1000,
                    target_port=9000,
                    headers=[st.HeaderMatch("x-dev", f"v{rng.randrange(3)}")]
                    if mech == "http" and rng.random() < 0.7
                    else [],
                )
                s.create_intercept(rng.choice(clients), req)
            elif op < 0.55 and clients:
                c = rng.choice(clients)
                s.remove_intercept(c, f"i{rng.randrange(6)}")
            elif op < 0.7 and agent_sids and s._intercepts:
                a = rng.choice(agent_sids)
                iid = rng.choice(list(s._intercepts))
                s.review(
                    a, iid, Review(disposition=rng.choice(["ACTIVE", "AGENT_ERROR", "BAD_ARGS"]))
                )
            elif op < 0.8 and (clients or agent_sids):
                sid = rng.choice(clients + agent_sids)
                s.depart(sid)
            elif op < 0.9:
                now[0] += rng.choice([0.5, 3, 10, 20])
                who = rng.choice(clients + agent_sids) if (clients or agent_sids) else None
                if who and rng.random() < 0.7:
                    with contextlib.suppress(st.NotFound):
                        s.remain(who)
                s.expire()
            else:
                now[0] += rng.choice([1, 6])
                s.check_waiting()
        except st.StateError:
            pass
            indexes_match_a_recount(s)
        topics = s.changes()
        after = snapshots(s)
        for sid, snap in before.items():
            info = infos[sid]
            named = st.session_topic(sid) in topics or (
                isinstance(info, AgentInfo)
                and st.workload_topic(info.namespace, info.name) in topics
            )
            if sid not in after:
                assert st.session_topic(sid) in topics, "ended session not named"
            elif after[sid] != snap:
                changed_seen += 1
                assert named, (step, sid, op)
        clients = [c for c in clients if c in s._sessions]
        agent_sids = [a for a in agent_sids if a in s._sessions]
    assert changed_seen > 100  # the run did change snapshots, often
