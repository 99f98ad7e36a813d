"""Shared test set-up: enough file descriptors for 1,000 connections, and loopback helpers."""

from __future__ import annotations

import resource

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < 8192:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))
