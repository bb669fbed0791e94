"""Explicit SRAM lifetimes: a step's scope releases what it allocated unless kept, a
release ends a lifetime at its last use, and the engine's reported peaks do not depend
on who still holds a Python reference."""

from __future__ import annotations

import pytest

from waferllm.engine.run_config import RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.hardware import get_wafer
from waferllm.mesh import Mesh, compute
from waferllm.models.testing import tiny_config

WSE2 = get_wafer("wse2")


def test_scope_releases_what_it_allocated_unless_kept():
    mesh = Mesh.square(WSE2, 2, mode="dry")
    sram = mesh.sram
    weight = mesh.place((4, 4), ("y", "x"), "fp32")  # 16 B per PE, before any scope
    with sram.scope() as outer:
        a = mesh.place((4, 4), ("y", "x"), "fp32")
        with sram.scope() as inner:
            b = mesh.place((4, 4), ("y", "x"), "fp32")
            c = mesh.place((4, 4), ("y", "x"), "fp32")
            inner.release(b)  # its last use: gone although `b` still refers to it
            assert sram.used_max() == 3 * 16
            inner.keep(c)
        assert sram.used_max() == 3 * 16  # weight, a, and c kept for the outer step
        outer.keep(a)
    assert sram.used_max() == 2 * 16  # c was the outer step's and not kept by it
    assert sram.peak_bytes == 4 * 16
    del a, b, c, weight  # Python dropping the tensors later changes nothing twice
    assert sram.used_max() == 0


def test_scope_leaves_allocations_it_did_not_make():
    mesh = Mesh.square(WSE2, 2, mode="dry")
    handle = mesh.sram.alloc("cache", 8)
    with mesh.sram.scope():
        mesh.sram.resize(handle, 24)  # a cache growing during a step stays the cache
    assert mesh.sram.used_max() == 24


@pytest.mark.parametrize("kv_scheme", ["shift", "concat"])
def test_peaks_do_not_depend_on_python_references(monkeypatch, kv_scheme):
    """Holding every elementwise result alive (a trace, a debugger) leaves the peaks as they were."""
    cfg = tiny_config(num_layers=2)
    run = RunConfig(4, 3, max_seq_len=16, prompt_len=9, dtype="fp16", kv_scheme=kv_scheme)

    def peaks():
        wm = WaferModel(cfg, None, WSE2, run, mode="dry")
        wm.prefill(9)
        for _ in range(3):
            wm.decode(None)
        return wm.request_metrics()["sram_peak_bytes_per_pe"]

    free = peaks()
    held = []
    original = compute.elementwise

    def holding(*a, **k):
        out = original(*a, **k)
        held.append(out)
        return out

    monkeypatch.setattr(compute, "elementwise", holding)
    assert peaks() == free
    assert len(held) > 20
