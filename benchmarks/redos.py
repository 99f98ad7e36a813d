"""A hostile header rule, `(a+)+b`, against values of a's: Python's backtracking `re` (what the
agent used before) against the RE2 rules it uses now (`tpproxy.routing`), medians of 5.

    .venv/bin/python benchmarks/redos.py

`re` doubles its time with every extra character (so it is only run up to 24 of them, and the
hours at 40 are extrapolated); RE2 grows linearly with the value's length. Last, the costliest rule the limits admit
(`tpproxy.routing.MAX_REGEX_PROGRAM`) on the longest header value the agent accepts.
"""

from __future__ import annotations

import functools
import re
import statistics
import time
from collections.abc import Callable

from tpproxy.routing import HeaderRule


def median_seconds(work: Callable[[], object], rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    pattern = "(a+)+b"
    backtracking = re.compile(pattern)
    print("Python re, fullmatch of (a+)+b:")
    last = 0.0
    for n in (16, 18, 20, 22, 24):
        value = "a" * n
        last = median_seconds(functools.partial(backtracking.fullmatch, value), rounds=3)
        print(f"  {n:>7} a's: {last * 1e3:10.2f} ms")
    print(f"  (40 a's, extrapolated at x2 per character: {last * 2**16 / 3600:.1f} hours)")
    rule = HeaderRule.make("x-dev", "regex", pattern, "headers[0]")
    print("tpproxy rule (RE2), the same match on a request's header:")
    base = 0.0
    for n in (24, 1_000, 10_000, 100_000, 1_000_000):
        headers = {"x-dev": ["a" * n]}
        took = median_seconds(functools.partial(rule.matches, headers))
        base = base or took / n
        print(
            f"  {n:>7} a's: {took * 1e3:10.3f} ms   ({took / n / base:4.2f}x the time per a of 24)"
        )
    # The costliest rule the limits let through: a program near MAX_REGEX_PROGRAM whose DFA
    # overflows its cache, against a header value as long as the agent's head limit allows.
    worst = HeaderRule.make("x-dev", "regex", "(?s)(?:.*a.{140})", "headers[0]")
    long_head = {"x-dev": ["a" * 32_768]}
    took = median_seconds(functools.partial(worst.matches, long_head))
    print(f"worst allowed rule (?s).*a.{{140}} (992 instructions) on 32 KiB: {took * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
