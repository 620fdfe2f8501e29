"""Suite-wide guard: nothing in the tests may reach the network (weights resolve offline or fail clearly)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("EXCELSEG_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("EXCELSEG_CLIP", raising=False)
