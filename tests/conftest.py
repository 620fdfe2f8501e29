"""Suite-wide guards: no network, and no test leaks state into another (the suite runs in random order).

* Weights resolve offline or fail clearly (environment switches).
* Every test starts from the same torch RNG state and thread count and cannot leave a changed thread count,
  default dtype or grad mode behind, whatever order pytest-randomly picks (``make test`` runs a fixed seed).
* Under pytest-xdist (``make test`` runs ``-n auto``) each worker gets its share of the cores as torch threads,
  and so do the processes its tests start (``OMP_NUM_THREADS``), so workers do not oversubscribe the CPU; every tolerance holds for any thread count (docs/tests.md).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: the cores are shared by the N worker processes
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    # ... and by the processes a test starts (CLI runs, torchrun, forked workers): they inherit this share
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("EXCELSEG_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("EXCELSEG_CLIP", raising=False)


@pytest.fixture(autouse=True)
def _isolated_torch_state():
    torch.manual_seed(0)
    torch.set_num_threads(_THREADS)
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    yield
    torch.set_num_threads(_THREADS)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)


@pytest.fixture
def one_thread():
    """One torch thread for this test (a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models' ops run many times slower on two threads of a shared machine. Per test, because
    :func:`_isolated_torch_state` resets the count before each test; it restores it afterwards."""
    torch.set_num_threads(1)
