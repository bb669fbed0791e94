"""--threads: the host's BLAS and tile-product workers, capped for a block or the process."""

from __future__ import annotations

import numpy as np
import pytest

from waferllm.engine.threads import current_threads, limit_threads, set_threads
from waferllm.errors import RequestError
from waferllm.mesh import compute


def test_limit_threads_caps_blas_and_workers_then_restores():
    before = current_threads()
    with limit_threads(1):
        now = current_threads()
        assert now["workers"] == 1
        assert all(n == 1 for n in now["blas"])
    assert current_threads() == before


def test_set_threads_holds_until_reset():
    try:
        set_threads(1)
        assert compute.workers() == 1 and all(n == 1 for n in current_threads()["blas"])
    finally:
        set_threads(None)
    assert compute.workers() == max(1, min(8, __import__("os").cpu_count() or 1))


def test_threads_do_not_change_a_product():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 64, 8, 16)).astype(np.float32), rng.standard_normal((2, 64, 16, 8)).astype(np.float32)
    with limit_threads(1):
        one = compute._batched_matmul(a, b, None, False)
    assert np.array_equal(one, compute._batched_matmul(a, b, None, False))


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(RequestError, match="threads must be a positive whole number"):
        set_threads(bad)
    with pytest.raises(RequestError, match="threads must be a positive whole number"):
        with limit_threads(bad):
            pass
