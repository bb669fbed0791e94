"""Decode of several requests at once: the skinny MeshGEMM, and the batched engine."""

from __future__ import annotations

import numpy as np
import pytest

from waferllm.hardware import get_wafer
from waferllm.kernels import gemv
from waferllm.mesh import Mesh, Region

WAFER = get_wafer("wse2")


def _mesh(n, mode="numeric"):
    return Mesh(Region(WAFER, n, n, name=f"{n}x{n}"), mode=mode)


@pytest.mark.parametrize("w_layout", [("y", "x"), ("x", "y")])
def test_batched_gemv_rows_equal_single_gemvs(w_layout):
    rng = np.random.default_rng(0)
    mesh = _mesh(4)
    K, N, B = 24, 20, 3
    W = rng.standard_normal((K, N)).astype(np.float32)
    X = rng.standard_normal((B, K)).astype(np.float32)
    w = mesh.place(W, w_layout, "fp32")
    red = w_layout[0]
    batched = gemv(mesh.place(X, (None, red), "fp32"), w).out.to_global()
    np.testing.assert_allclose(batched, X @ W, rtol=1e-5, atol=1e-5)
    for b in range(B):  # bit for bit what the request computes alone
        alone = gemv(mesh.place(X[b], (red,), "fp32"), w).out.to_global()
        np.testing.assert_array_equal(batched[b], alone)


def test_batched_gemv_cost_is_one_skinny_gemm_and_one_reduce():
    """B rows: B times the MACs and the reduce's payload, one collective's fixed costs."""
    K, N = 4096, 4096
    costs = {}
    for B in (1, 4):
        mesh = _mesh(64, mode="dry")
        w = mesh.place((K, N), ("y", "x"), "fp16")
        x = mesh.place((B, K) if B > 1 else (K,), (None, "y") if B > 1 else ("y",), "fp16")
        rep = gemv(x, w, out_dtype="fp32").report
        costs[B] = (mesh.ledger.totals["flops"], mesh.ledger.totals["bytes_moved"], mesh.ledger.cycles,
                    mesh.ledger.by_primitive["meshgemv.allreduce"])
    f1, b1, c1, r1 = costs[1]
    f4, b4, c4, r4 = costs[4]
    assert f4 == pytest.approx(4 * f1)
    assert b4 == pytest.approx(4 * b1)
    # four requests in one step cost less than four steps (fixed costs and hop latency paid once)
    assert c1 < c4 < 4 * c1
    assert r4 < 4 * r1
