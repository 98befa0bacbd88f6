"""Tiny random LlamaGen models shared by the sampler tests (fast on one CPU thread)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every sampler test runs on one thread (tests/conftest.py)."""
    yield
