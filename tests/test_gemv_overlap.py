"""A GEMV's reduce streamed in segments of output columns, the next chunk's local product
overlapping it (``gemv_overlap="segmented"``): the values are the paper design's bit for bit,
the cost lies between what it overlaps and the paper's, one segment is the paper's GEMV, and
the switch reaches the engine, ``predict`` and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from waferllm.engine.predict import predict_run
from waferllm.engine.run_config import ALGORITHMS, RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.errors import MeshError, RequestError
from waferllm.hardware import get_wafer
from waferllm.interfaces import algorithm_options
from waferllm.interfaces.cli import main
from waferllm.kernels.meshgemv import gemv
from waferllm.kernels.norm_gemv import norm_gemv
from waferllm.mesh import Mesh, Region, comm
from waferllm.mesh.tensor import DistTensor, QuantTensor
from waferllm.models.presets import get_model_preset
from waferllm.models.testing import random_weights, tiny_config

WSE2 = get_wafer("wse2")
#: a PE that multiplies slowly, so that products are long enough for a stream to hide them
SLOW = WSE2.replace(fp32_macs_per_cycle=0.05, fp16_macs_per_cycle=0.1, sram_bytes_per_pe=96 * 1024)


def _mesh(n, wafer=SLOW, mode="numeric"):
    return Mesh(Region(wafer, n, n, name=f"{n}x{n}"), mode=mode)


def _operands(m, K, N, red, batch, quant=False, seed=0):
    rng = np.random.default_rng(seed)
    out = "x" if red == "y" else "y"
    xs = None if not m.numeric else rng.standard_normal((batch or 1, K)).astype(np.float32)
    if batch is None:
        x = DistTensor(m, (K,), (red,), "fp32", None if xs is None else m.place(xs[0], (red,), "fp32").tiles)
    else:
        x = m.place(xs, (None, red), "fp32") if m.numeric else DistTensor(m, (batch, K), (None, red), "fp32", None)
    wh = rng.standard_normal((K, N)).astype(np.float32) if m.numeric else (K, N)
    if quant:
        from waferllm.models import quant as q

        qt = q.quantize(wh, "int8")
        w = QuantTensor.from_global(m, qt.q, (red, out), "int8", scales=qt.scales(), compute_dtype="fp16",
                                    scale_slots=q.scale_slots(np.arange(K), -(-K // m.rows)), name="w")
    else:
        w = m.place(wh, (red, out), "fp16", name="w")
    return x, w


def _kernel_events(m, mark_len):
    evs = m.ledger.events[mark_len:]
    return sum(e.cycles for e in evs if e.kind == "compute"), sum(e.cycles for e in evs if e.kind == "comm")


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("red", ["y", "x"])
@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("segments", [2, 5, "tuned"])
def test_segmented_gemv_values_are_the_paper_values(red, batch, segments):
    m = _mesh(6)
    x, w = _operands(m, 72, 90, red, batch)
    paper = gemv(x, w, out_dtype="fp32").out.tiles
    streamed = gemv(x, w, out_dtype="fp32", segments=segments)
    assert streamed.report.extra["segments"] > 1
    np.testing.assert_array_equal(streamed.out.tiles, paper)


@pytest.mark.parametrize("red", ["y", "x"])
def test_segmented_norm_gemv_values_are_the_paper_values(red):
    m = _mesh(5)
    h, w = _operands(m, 60, 80, red, 2, seed=1)
    g = m.place(np.linspace(0.5, 1.5, 60).astype(np.float32), (red,), "fp32")
    paper = norm_gemv(h, g, w, 1e-5).out.tiles
    streamed = norm_gemv(h, g, w, 1e-5, segments=4)
    assert streamed.report.extra["segments"] == 4
    np.testing.assert_array_equal(streamed.out.tiles, paper)


def test_segmented_quantised_gemv_values_are_the_paper_values():
    m = _mesh(4)
    x, w = _operands(m, 64, 48, "y", 2, quant=True, seed=2)
    np.testing.assert_array_equal(gemv(x, w, out_dtype="fp32", segments=3).out.tiles,
                                  gemv(x, w, out_dtype="fp32").out.tiles)


# ------------------------------------------------------------------ cost


@pytest.mark.parametrize("wafer", [SLOW, WSE2], ids=["slow-pe", "wse2"])
@pytest.mark.parametrize("n,K,N", [(8, 512, 1024), (360, 4096, 14336 * 2)])
def test_overlapped_cost_between_its_own_work_and_the_paper_cost(wafer, n, K, N):
    """Below the paper's product-then-reduce, and not below the larger of the kernel's own
    compute and communication (what any overlap of them must take), both from the ledger."""
    paper_m, m = _mesh(n, wafer, "dry"), _mesh(n, wafer, "dry")
    x, w = _operands(paper_m, K, N, "y", None)
    paper = gemv(x, w, out_dtype="fp32").report.cycles
    x, w = _operands(m, K, N, "y", None)
    before = len(m.ledger.events)
    rep = gemv(x, w, out_dtype="fp32", segments="tuned").report
    compute, comm_ = _kernel_events(m, before)
    assert rep.extra["segments"] > 1
    assert max(compute, comm_) < rep.cycles < paper
    assert compute == pytest.approx(rep.compute_cycles) and comm_ == pytest.approx(rep.comm_cycles)


def test_one_segment_is_the_paper_gemv():
    def run(**kw):
        m = _mesh(8, SLOW, "dry")
        x, w = _operands(m, 512, 1024, "y", 2)
        rep = gemv(x, w, out_dtype="fp32", **kw).report
        return rep.cycles, [(e.name, e.kind, e.cycles) for e in m.ledger.events], dict(m.ledger.totals)

    assert run() == run(segments=1)
    # and a stream of one segment is exactly one reduce
    m1, m2 = _mesh(8, SLOW, "dry"), _mesh(8, SLOW, "dry")
    t1 = DistTensor(m1, (2, 8 * 16), (None, "x"), "fp32", None, partial=("y", "sum"))
    t2 = DistTensor(m2, (2, 8 * 16), (None, "x"), "fp32", None, partial=("y", "sum"))
    comm.reduce(t1, "y", name="r")
    comm.reduce_stream(t2, "y", [16], name="r")
    assert m1.ledger.cycles == m2.ledger.cycles and m1.ledger.totals == m2.ledger.totals


@pytest.mark.parametrize("n,K,N", [(8, 512, 1024), (60, 4096, 4096 * 3), (60, 14336, 4096)])
def test_the_count_chosen_is_the_fastest_executed(n, K, N):
    """``segments="tuned"`` prices the stream as it executes: it costs the least of every count
    it considers, run one by one; and a segment per column costs more (fixed costs per message)."""
    def cycles(s):
        m = _mesh(n, SLOW, "dry")
        x, w = _operands(m, K, N, "y", None)
        return gemv(x, w, out_dtype="fp32", segments=s).report.cycles

    tn = -(-N // n)
    executed = [cycles(s) for s in range(1, min(tn, 16) + 1)]
    assert cycles("tuned") == pytest.approx(min(executed))
    assert cycles(tn) > min(executed)


def test_reduce_stream_refuses_segments_that_do_not_fill_the_tile():
    m = _mesh(4, SLOW, "dry")
    t = DistTensor(m, (4 * 6,), ("x",), "fp32", None, partial=("y", "sum"))
    with pytest.raises(MeshError, match="do not fill"):
        comm.reduce_stream(t, "y", [4, 4])


# ------------------------------------------------------------------ the engine and the switch


def test_segmented_decode_same_logits_and_faster():
    cfg = tiny_config(name="overlap", num_layers=2)
    w = random_weights(cfg, seed=3)
    out = {}
    for overlap in ("paper", "segmented"):
        run = RunConfig(4, 4, max_seq_len=24, dtype="fp32", gemv_overlap=overlap)
        wm = WaferModel(cfg, w, SLOW, run, mode="numeric")
        wm.reset()
        tok = int(np.argmax(wm.prefill([3, 17, 99, 5])[-1]))
        logits, t0 = [], wm.ledger.cycles
        for _ in range(4):
            logits.append(wm.decode(tok))
            tok = int(np.argmax(logits[-1]))
        streamed = any(e.name.endswith("allreduce.tail") for e in wm.ledger.events)
        out[overlap] = (logits, wm.ledger.cycles - t0, streamed)
    for a, b in zip(out["paper"][0], out["segmented"][0]):
        np.testing.assert_array_equal(a, b)
    assert not out["paper"][2] and out["segmented"][2]
    assert out["segmented"][1] < out["paper"][1]


def test_switch_is_validated_and_in_beyond_paper():
    assert ALGORITHMS["gemv_overlap"] == ("paper", "segmented")
    assert RunConfig().gemv_overlap == "paper"
    with pytest.raises(RequestError, match="gemv_overlap must be one of paper, segmented"):
        RunConfig(gemv_overlap="always")
    assert algorithm_options.chosen("paper", "paper", "paper", True)["gemv_overlap"] == "segmented"
    assert algorithm_options.chosen("paper", "paper", "paper", False, "segmented")["gemv_overlap"] == "segmented"


def test_switch_reaches_predict_and_the_cli(capsys):
    cfg = get_model_preset("smollm2-135m")
    args = ["--model", "smollm2-135m", "--input-len", "64", "--output-len", "8", "--prefill-grid", "64",
            "--decode-grid", "48", "--json"]

    def cli(*extra):
        assert main(["predict", *args, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    def py(overlap):
        run = RunConfig.for_request(64, 8, prefill_grid=64, decode_grid=48, gemv_overlap=overlap)
        return predict_run(cfg, WSE2, run, 64, 8, False, False, False)

    paper, seg = py("paper"), py("segmented")
    assert seg["decode_tokens_per_s"] > paper["decode_tokens_per_s"]
    assert seg["ttft_s"] == paper["ttft_s"]  # decode only
    assert cli("--gemv-overlap", "segmented")["decode_tokens_per_s"] == pytest.approx(seg["decode_tokens_per_s"])
    assert cli()["decode_tokens_per_s"] == pytest.approx(paper["decode_tokens_per_s"])
    assert main(["predict", *args, "--gemv-overlap", "sometimes"]) == 2
    assert "gemv_overlap must be one of paper, segmented" in capsys.readouterr().err
