"""Tests of order metadata: fields, sources and precedence."""

from __future__ import annotations
