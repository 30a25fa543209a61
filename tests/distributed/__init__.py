"""Tests of the site DAGs on CeleryExecutor with PostgreSQL and Redis, run as local processes."""

from __future__ import annotations
