"""Tests of the site DAG factory and the DAG files."""

from __future__ import annotations
