"""Host threads: how many the simulation and the dense reference may use.

Two pools do the host's arithmetic: the BLAS library numpy calls (every tile product and
the reference's matrix products) and the simulator's own workers, which split one large
batched tile product over the PE rows (:mod:`waferllm.mesh.compute`). ``set_threads(n)``
caps both at ``n`` for the rest of the process; ``limit_threads(n)`` caps them for a block
and puts the previous limits back. ``None`` (or 0) leaves the defaults: BLAS's own, and
one simulator worker per core (at most 8).

Only host wall time depends on the setting: the predicted wafer figures, the ledger's
counters and the logits do not (every product is summed in the same order).
"""

from __future__ import annotations

from contextlib import contextmanager

from threadpoolctl import threadpool_info, threadpool_limits

from waferllm.errors import RequestError
from waferllm.mesh import compute

_limits = None  # the process-wide BLAS limit set_threads() holds


def _check(n) -> int | None:
    if n is None or n == 0:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise RequestError(f"threads must be a positive whole number (0 or None: the defaults), got {n!r}")
    return n


def set_threads(n: int | None) -> None:
    """Cap BLAS and the simulator's workers at ``n`` threads for the rest of the process
    (``None`` or 0: back to the defaults)."""
    global _limits
    n = _check(n)
    if _limits is not None:  # undo an earlier cap first, so None really restores the defaults
        _limits.restore_original_limits()
        _limits = None
    if n is not None:
        _limits = threadpool_limits(limits=n)
    compute.set_workers(n)


@contextmanager
def limit_threads(n: int | None):
    """Cap BLAS and the simulator's workers at ``n`` threads inside the block (``None`` or 0:
    leave them as they are)."""
    n = _check(n)
    if n is None:
        yield
        return
    before = compute.workers()
    with threadpool_limits(limits=n):
        compute.set_workers(n)
        try:
            yield
        finally:
            compute.set_workers(before)


def current_threads() -> dict:
    """The threads each pool may use now: ``{"blas": [...], "workers": n}``."""
    return {"blas": [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"],
            "workers": compute.workers()}
