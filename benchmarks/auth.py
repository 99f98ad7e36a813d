"""What authentication costs the manager per call: heartbeats (`POST .../remain`) of one client
session on a real API server, enforcing (a bearer token checked by TokenReview, then cached;
the session's owner compared) against permissive with no token (no check at all), in one run,
alternating rounds. Also the cost of a call whose token is not cached (one TokenReview).

    .venv/bin/python benchmarks/auth.py [--calls 2000] [--rounds 5]

Loopback only. Medians of the rounds, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

import aiohttp

from tpcontrol.kube.agentconfig import GeneratorSettings
from tpcontrol.localcluster import LocalControlPlane
from tpcontrol.manager.api import Manager, ManagerSettings


async def heartbeats(url: str, headers: dict[str, str], calls: int) -> float:
    """Seconds per heartbeat, one session, calls in sequence on one keep-alive connection."""
    async with aiohttp.ClientSession(headers=headers) as http:
        body = {"name": "bench@host", "version": "0"}
        async with http.post(f"{url}/v1/clients", json=body) as r:
            assert r.status == 201, await r.text()
            sid = (await r.json())["sessionId"]
        started = time.perf_counter()
        for _ in range(calls):
            async with http.post(f"{url}/v1/sessions/{sid}/remain") as r:
                assert r.status == 204, await r.text()
        return (time.perf_counter() - started) / calls


async def bench(plane: LocalControlPlane, calls: int, rounds: int) -> None:
    async with plane.api() as api:
        managers = {}
        for mode in ("enforcing", "permissive"):
            settings = ManagerSettings(
                generator=GeneratorSettings(agent_image="bench/agent:0"), auth_mode=mode
            )
            manager = Manager(api, settings)
            runner, port = await manager.start()
            managers[mode] = (manager, runner, f"http://127.0.0.1:{port}")
        admin = {"authorization": f"Bearer {plane.tokens['admin']}"}
        try:
            seconds: dict[str, list[float]] = {"enforcing": [], "permissive": []}
            for _ in range(rounds):
                for mode, (_, _, url) in managers.items():
                    headers = admin if mode == "enforcing" else {}
                    seconds[mode].append(await heartbeats(url, headers, calls))
            enforcing, _, url = managers["enforcing"]
            fresh: list[float] = []
            for _ in range(20):  # uncached: a new manager-side cache each time
                enforcing.auth.forget()
                enforcing.access.forget()
                fresh.append(await heartbeats(url, admin, 1))
        finally:
            for manager, runner, _ in managers.values():
                await manager.stop()
                await runner.cleanup()
    med = {mode: statistics.median(v) * 1e6 for mode, v in seconds.items()}
    print(f"heartbeats: {calls} per round, {rounds} rounds, medians")
    print(f"  permissive, no token      {med['permissive']:8.1f} us/call")
    print(f"  enforcing, cached review  {med['enforcing']:8.1f} us/call "
          f"({med['enforcing'] / med['permissive']:.2f}x, +{med['enforcing'] - med['permissive']:.1f} us)")  # fmt: skip
    print(f"  enforcing, review not cached (arrive + 1 heartbeat, median of 20): "
          f"{statistics.median(fresh) * 1e3:.2f} ms")  # fmt: skip
    print(
        f"  TokenReviews sent: {enforcing.auth.calls}, SubjectAccessReviews: {enforcing.access.calls}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    # Permissive logs each refusal it lets through; here that would time the log, not the check.
    logging.getLogger("tpcontrol").setLevel(logging.ERROR)
    with LocalControlPlane(controller_manager=False) as plane:
        asyncio.run(bench(plane, args.calls, args.rounds))


if __name__ == "__main__":
    main()
