"""Why a pod is not running, in a line or two: what a person needs when a step fails.

Plain functions over the API's JSON (pods and events as `kubectl get -o json` prints them), so
the demo and the tests say "shop-5d8f: container web waiting: CrashLoopBackOff (back-off 10s
restarting failed container...), 3 restarts; last event: ..." instead of listing every pod.
"""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]


def container_trouble(status: Json) -> str | None:
    """What is wrong with one container status, or None when it is running and ready."""
    state = status.get("state") or {}
    restarts = status.get("restartCount", 0)
    again = f", {restarts} restarts" if restarts else ""
    if "waiting" in state:
        waiting = state["waiting"]
        message = (waiting.get("message") or "").strip()
        detail = f" ({_tail(message)})" if message else ""
        return f"container {status['name']} waiting: {waiting.get('reason', '?')}{detail}{again}"
    if "terminated" in state:
        ended = state["terminated"]
        return (
            f"container {status['name']} terminated: {ended.get('reason', '?')} "
            f"exit {ended.get('exitCode', '?')}{again}"
        )
    if not status.get("ready"):
        return f"container {status['name']} running, not ready{again}"
    return None


def _completed(status: Json) -> bool:
    """An init container that did its job (exit 0) is no trouble."""
    ended = (status.get("state") or {}).get("terminated") or {}
    return bool(ended.get("exitCode") == 0)


def pod_trouble(pod: Json, events: list[Json]) -> str:
    """One pod's state: phase, the first container in trouble, and its latest warning event."""
    meta, status = pod["metadata"], pod.get("status") or {}
    name = meta["name"]
    phase = "Terminating" if meta.get("deletionTimestamp") else status.get("phase", "Pending")
    statuses = [
        *(s for s in status.get("initContainerStatuses") or [] if not _completed(s)),
        *(status.get("containerStatuses") or []),
    ]
    troubles = [t for s in statuses if (t := container_trouble(s))]
    line = f"{name}: {phase}"
    if troubles:
        line += "; " + troubles[0]
    mine = [
        e for e in events
        if (e.get("involvedObject") or {}).get("uid") == meta.get("uid")
        and e.get("type") == "Warning"
    ]  # fmt: skip
    if mine:
        last = max(mine, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        line += f"\n  last warning: {last.get('reason', '?')}: {(last.get('message') or '')[:200]}"
    elif not troubles:
        for condition in status.get("conditions") or []:
            if condition.get("status") != "True" and condition.get("message"):
                line += f"; {condition['type']}: {condition['message'][:160]}"
                break
    return line


def pods_trouble(pods: list[Json], events: list[Json], most: int = 3) -> str:
    """The pods that are not running and ready, `most` of them, one or two lines each."""

    def healthy(pod: Json) -> bool:
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        return bool(statuses) and all(container_trouble(s) is None for s in statuses)

    bad = [p for p in pods if not healthy(p)]
    if not bad:
        return f"{len(pods)} pods, all running and ready" if pods else "no pods"
    lines = [pod_trouble(p, events) for p in bad[:most]]
    if len(bad) > most:
        lines.append(f"(and {len(bad) - most} more pods not ready)")
    return "\n".join(lines)


def _tail(message: str, most: int = 160) -> str:
    """The end of a long message: runtimes put the cause last, after their own layers'
    prefixes ("failed to create shim task: OCI runtime create failed: ... exec: ...")."""
    return message if len(message) <= most else "..." + message[-(most - 3) :]
