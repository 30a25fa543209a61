"""Tests of the operators."""

from __future__ import annotations
