"""Tests of staging: discovery, classification, quarantine and planning."""

from __future__ import annotations
