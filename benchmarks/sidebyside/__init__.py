"""The side-by-side benchmark (`benchmarks/compare.py`) by job: noise discipline, processes,
upstreams, contenders, checks, load, measuring, report, tools."""
