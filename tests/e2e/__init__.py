"""End-to-end runs of a site DAG against the sandbox."""

from __future__ import annotations
