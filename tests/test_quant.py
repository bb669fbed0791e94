"""Quantised weights on the PEs: GGUF Q8_0 / Q4_0 blocks stored in SRAM, dequantised in the PE.

The quantisers are checked against the ``gguf`` package's own (bytes equal); SRAM is
charged at the stored size (integers plus the fp16 scales a tile column needs, counted
here by brute force); the cost of a product grows by exactly the dequantising work of
the tile it uses; numeric runs equal the dense engine run on the same dequantised
weights bit for bit, and the dense reference within the fp32 tolerance the engine tests
use; ``--weights native`` keeps a GGUF file's own blocks and refuses anything else.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from waferllm.engine.placement import layer_matrices, plan, quantized_layer_bytes
from waferllm.engine.run_config import RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.errors import MeshError, PlacementError, RequestError
from waferllm.hardware import get_wafer
from waferllm.kernels.meshgemm import meshgemm, place_b
from waferllm.kernels.meshgemv import gemv
from waferllm.mesh.cost import compute_cycles
from waferllm.mesh.runtime import Mesh
from waferllm.mesh.tensor import QuantTensor
from waferllm.models import quant
from waferllm.models.presets import get_model_preset
from waferllm.models.reference import ReferenceModel
from waferllm.models.testing import random_weights, tiny_config, write_gguf

WSE2 = get_wafer("wse2")
BIG = WSE2.replace(sram_bytes_per_pe=96 * 1024)
PROMPT = [3, 17, 99, 5, 200, 7, 1, 44, 9, 130, 61]
STEPS = 4
FP32_TOL = 1e-4


# ------------------------------------------------------------------ the block formats


@pytest.mark.parametrize("fmt,qtype", [("int8", "Q8_0"), ("int4", "Q4_0")])
def test_quantisers_give_the_gguf_packages_blocks(fmt, qtype):
    import gguf

    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    w[32:64, 3] = 0.0  # an all-zero block
    w[0:32, 5] = np.linspace(-1, 1, 32)  # ties at .5 after scaling
    m = quant.quantize(w, fmt)
    raw = gguf.quants.quantize(np.ascontiguousarray(w.T), gguf.GGMLQuantizationType[qtype])  # [N, bytes]
    nb = w.shape[0] // 32
    blocks = raw.reshape(w.shape[1], nb, -1)
    d = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)[:, :, 0].T
    assert np.array_equal(m.d.view(np.uint16), d.view(np.uint16))
    if fmt == "int8":
        q = blocks[:, :, 2:].view(np.int8).reshape(w.shape[1], -1).T
    else:
        body = blocks[:, :, 2:]
        q = (np.concatenate([body & 0x0F, body >> 4], axis=2).astype(np.int8) - 8).reshape(w.shape[1], -1).T
    assert np.array_equal(m.q, q)
    # and the values are the package's dequantised ones
    deq = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(w.shape[1], -1).T
    assert np.array_equal(m.dequantize(), deq)


def test_block_error_is_at_most_half_a_step():
    w = np.random.default_rng(2).standard_normal((70, 9)).astype(np.float32)  # a short last block
    m8, m4 = quant.quantize(w, "int8"), quant.quantize(w, "int4")
    assert m8.q.shape == (70, 9) and m8.d.shape == (3, 9)
    # half a step, plus the scale's rounding to fp16 (2^-11 relative) times the largest integer
    step8 = np.repeat(m8.d.astype(np.float32), 32, axis=0)[:70]
    assert np.all(np.abs(w - m8.dequantize()) <= step8 * (0.5 + 127 * 2.0 ** -11) * (1 + 1e-5))
    assert m8.q.min() >= -127 and m8.q.max() <= 127 and m4.q.min() >= -8 and m4.q.max() <= 7
    # Q4_0 clamps the top of the range at 7 (a whole step off there)
    step4 = np.abs(np.repeat(m4.d.astype(np.float32), 32, axis=0)[:70])
    assert np.all(np.abs(w - m4.dequantize()) <= step4 * (1 + 8 * 2.0 ** -11) * (1 + 1e-5))
    assert m8.nbytes == 70 * 9 + 3 * 9 * 2 and m4.nbytes == math.ceil(70 * 9 / 2) + 3 * 9 * 2


def test_scale_slots_count_the_blocks_a_tile_touches():
    rng = np.random.default_rng(3)
    for _ in range(30):
        k, tile = int(rng.integers(1, 300)), int(rng.integers(1, 70))
        rows = rng.permutation(k) if rng.random() < 0.5 else np.arange(k)
        rows = np.where(rng.random(k) < 0.1, -1, rows)
        expect = max(len({int(r) // 32 for r in rows[i: i + tile] if r >= 0}) for i in range(0, k, tile))
        assert quant.scale_slots(rows, tile) == expect


# ------------------------------------------------------------------ storage and cost on the mesh


def _quant_weight(mesh, k, n, fmt, layout=("y", "x"), seed=0):
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    m = quant.quantize(w, fmt)
    tk = -(-k // (mesh.rows if layout[0] == "y" else mesh.cols))
    slots = quant.scale_slots(np.arange(k), tk)
    t = QuantTensor.from_global(mesh, m.q, layout, fmt, scales=m.scales(), compute_dtype="fp16", scale_slots=slots,
                                name="W")
    return w, m, t


@pytest.mark.parametrize("fmt,bits", [("int8", 8), ("int4", 4)])
def test_sram_is_charged_at_the_stored_size(fmt, bits):
    mesh = Mesh.square(WSE2, 5)
    before = mesh.sram.used_max()
    _, _, t = _quant_weight(mesh, 100, 37, fmt)
    tk, tn = 20, 8  # ceil(100 / 5), ceil(37 / 5)
    # rows 0-19 touch block 0; 20-39 blocks 0, 1; ... at most two blocks per tile
    assert t.scale_slots == 2
    assert t.bytes_per_pe == math.ceil(tk * tn * bits / 8) + 2 * tn * 2
    assert mesh.sram.used_max() - before == t.bytes_per_pe


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gemv_pays_the_dequantising_work_of_its_tiles(fmt):
    n, k, cols = 6, 192, 90
    costs = {}
    for kind in ("dense", fmt):
        mesh = Mesh.square(WSE2, n, mode="dry")
        x = mesh.place((k,), ("y",), "fp16", name="x")
        w = (mesh.place((k, cols), ("y", "x"), "fp16", name="W") if kind == "dense" else
             QuantTensor.from_global(mesh, (k, cols), ("y", "x"), fmt, compute_dtype="fp16", scale_slots=2, name="W"))
        before = dict(mesh.ledger.totals)
        gemv(x, w, out_dtype="fp32")
        costs[kind] = (mesh.ledger.compute_cycles, {c: mesh.ledger.totals[c] - before.get(c, 0) for c in
                                                    ("flops", "sram_read_bytes")})
    tk, tn, pes = 32, 15, n * n
    ops = WSE2.dequant_ops(fmt) * tk * tn
    assert costs[fmt][0] - costs["dense"][0] == pytest.approx(math.ceil(ops / WSE2.fp16_macs_per_cycle))
    assert costs[fmt][1]["flops"] - costs["dense"][1]["flops"] == ops * pes
    stored = math.ceil(tk * tn * (8 if fmt == "int8" else 4) / 8) + 2 * tn * 2
    assert costs["dense"][1]["sram_read_bytes"] - costs[fmt][1]["sram_read_bytes"] == (2 * tk * tn - stored) * pes


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_meshgemm_dequantises_every_step_and_shifts_the_stored_tiles(fmt):
    n, m_, k, cols = 4, 24, 128, 40
    rng = np.random.default_rng(4)
    a_host = rng.standard_normal((m_, k)).astype(np.float32)
    out, ledgers = {}, {}
    for kind in ("dense", fmt):
        mesh = Mesh.square(WSE2, n)
        qm = quant.quantize(np.random.default_rng(5).standard_normal((k, cols)).astype(np.float32), fmt)
        a = mesh.place(a_host, ("y", "x"), "fp16", name="A")
        if kind == "dense":
            b = place_b(mesh, qm.dequantize(), "fp16")
        else:
            b = place_b(mesh, qm.q, fmt, scales=qm.scales(), scale_slots=1)
        before = dict(mesh.ledger.totals)
        out[kind] = meshgemm(a, b, out_dtype="fp32").out.to_global()
        ledgers[kind] = {c: mesh.ledger.totals[c] - before.get(c, 0) for c in ("flops", "bytes_moved")}
        ledgers[kind]["b_bytes"] = b.bytes_per_pe
    assert np.array_equal(out[fmt], out["dense"])  # the same dequantised values
    kt, nt = 32, 10
    assert ledgers[fmt]["flops"] - ledgers["dense"]["flops"] == n * n * n * kt * nt * WSE2.dequant_ops(fmt)
    stored = math.ceil(kt * nt * (8 if fmt == "int8" else 4) / 8) + nt * 2
    assert ledgers[fmt]["b_bytes"] == stored
    # B's shifts carry the stored tile instead of the fp16 one; A's are the same
    assert ledgers["dense"]["bytes_moved"] - ledgers[fmt]["bytes_moved"] == n * (n * n) * (2 * kt * nt - stored)


def test_a_quantised_weight_only_moves_as_a_compute_view():
    mesh = Mesh.square(WSE2, 2)
    _, _, t = _quant_weight(mesh, 64, 8, "int8")
    with pytest.raises(MeshError, match="compute view"):
        t.with_tiles(t.tiles)
    with pytest.raises(MeshError, match="dtype must be fp16 or fp32"):
        mesh.place(np.zeros((4, 4)), ("y", "x"), "int8")


# ------------------------------------------------------------------ engine numerics


def _run(cfg, w, weights, dtype="fp32", grids=(4, 5), wafer=BIG):
    run = RunConfig(*grids, max_seq_len=len(PROMPT) + STEPS + 2, dtype=dtype, weights=weights)
    wm = WaferModel(cfg, w, wafer, run, mode="numeric")
    wm.reset()
    pre = wm.prefill(PROMPT, prompt_logits=True)
    dec, tok = [], int(np.argmax(pre[-1]))
    for _ in range(STEPS):
        lg = wm.decode(tok)
        dec.append(lg)
        tok = int(np.argmax(lg))
    return wm, pre, dec


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("name,extra,grids", [("gqa", {}, (4, 5)),
                                              ("odd", dict(hidden_size=60, num_heads=6, num_kv_heads=3, head_dim=10,
                                                           intermediate_size=100, vocab_size=263), (3, 4))])
def test_quantised_runs_equal_the_reference_on_the_dequantised_weights(fmt, name, extra, grids):
    cfg = tiny_config(name=name, **extra)
    w = random_weights(cfg, seed=11)
    deq = quant.dequantized_weights(quant.quantize_weights(w, fmt))
    wm, pre, dec = _run(cfg, w, fmt, grids=grids)
    _, pre_d, dec_d = _run(cfg, deq, "fp16", grids=grids)
    # the PEs' dequantised values are exactly the dense run's weights: the same logits, bit for bit
    assert np.array_equal(pre, pre_d) and all(np.array_equal(a, b) for a, b in zip(dec, dec_d))
    ref = ReferenceModel(deq, max_seq_len=len(PROMPT) + STEPS + 2)
    rp = ref.prefill(PROMPT)
    scale = np.max(np.abs(rp))
    assert np.max(np.abs(pre - rp)) / scale < FP32_TOL
    tok = int(np.argmax(pre[-1]))
    for lg in dec:
        rd = ref.decode(tok)
        assert np.max(np.abs(lg - rd)) / scale < FP32_TOL
        tok = int(np.argmax(lg))
    # the placed weights are the stored size the planner budgets, layer by layer
    for phase, stages in (("prefill", wm.prefill_stages), ("decode", wm.decode_stages)):
        st = stages[0]
        held = sum(t.bytes_per_pe for t in st.w[0].values())
        assert held == quantized_layer_bytes(cfg, st.mesh.rows, phase, fmt)


def test_fp16_quantised_run_equals_the_dense_fp16_run():
    cfg = tiny_config(name="gqa")
    w = random_weights(cfg, seed=12)
    deq = quant.dequantized_weights(quant.quantize_weights(w, "int8"))
    _, pre, dec = _run(cfg, w, "int8", dtype="fp16")
    _, pre_d, dec_d = _run(cfg, deq, "fp16", dtype="fp16")
    assert np.array_equal(pre, pre_d) and all(np.array_equal(a, b) for a, b in zip(dec, dec_d))


# ------------------------------------------------------------------ the file's own blocks


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory):
    cfg = tiny_config(name="q8")
    w = random_weights(cfg, seed=13)
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf")
    return write_gguf(path, w, quant="Q8_0"), w


def test_native_keeps_the_files_blocks(q8_gguf):
    import gguf

    from waferllm.models.loader import load_model

    path, w = q8_gguf
    loaded = load_model(path)
    assert quant.native_format(loaded) == "int8"
    native = quant.native_weights(loaded)
    m = native.layers[1].wq
    assert isinstance(m, quant.QuantMatrix) and m.fmt == "int8"
    # the file's blocks, independently: gguf quantised the permuted [out, in] rows
    assert np.array_equal(m.dequantize(), loaded.weights.layers[1].wq)
    raw = gguf.quants.quantize(np.ascontiguousarray(w.layers[1].w_down.T), gguf.GGMLQuantizationType.Q8_0)
    d = np.ascontiguousarray(raw.reshape(w.layers[1].w_down.shape[1], -1, 34)[:, :, :2]).view(np.float16)[:, :, 0]
    assert np.array_equal(native.layers[1].w_down.d, d.T)


def test_native_run_equals_the_reference_on_the_files_values(q8_gguf):
    from waferllm.engine.llm import LLM
    from waferllm.engine.sampling import SamplingParams

    path, _ = q8_gguf
    llm = LLM(path, wafer=BIG, prefill_grid=3, decode_grid=4, dtype="fp32", max_model_len=32, band=False,
              weights="native")
    assert llm.run.weights == "int8" and llm.weights_format == "int8"
    out = llm.generate_ids(PROMPT, SamplingParams(max_tokens=4, temperature=0))
    ref = ReferenceModel(llm.model.weights, max_seq_len=32)  # the file's dequantised values
    lg = ref.prefill(PROMPT)
    toks = [int(np.argmax(lg[-1]))]
    for _ in range(3):
        toks.append(int(np.argmax(ref.decode(toks[-1]))))
    assert out.token_ids == toks


def test_native_refuses_what_is_not_q8_0_or_q4_0(tmp_path):
    cfg = tiny_config(name="f32")
    path = write_gguf(str(tmp_path / "f32.gguf"), random_weights(cfg, seed=1))
    with pytest.raises(RequestError, match=r"Q8_0 or Q4_0 blocks.*are 14 F32"):
        quant.resolve_weights("native", path)
    with pytest.raises(RequestError, match="not a GGUF file"):
        quant.resolve_weights("native", "llama3-8b")
    with pytest.raises(RequestError, match="weights must be one of fp16, int8, int4, native"):
        RunConfig(weights="int2")
    with pytest.raises(RequestError, match="resolve it first"):
        RunConfig(3, 3, weights="native").plan(cfg, BIG)


def test_cli_weights_option(capsys):
    from waferllm.interfaces.cli import main

    assert main(["predict", "--model", "smollm2-135m", "--input-len", "64", "--output-len", "4", "--prefill-grid",
                 "40", "--decode-grid", "40", "--weights", "int4", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["weights"] == "int4"
    assert main(["predict", "--model", "smollm2-135m", "--weights", "native"]) != 0
    assert "not a GGUF file" in capsys.readouterr().err


# ------------------------------------------------------------------ the capacity effect


def test_placement_counts_the_stored_size():
    cfg = get_model_preset("llama3-8b")
    for phase, g in (("decode", 360), ("prefill", 600)):
        for fmt, bits in (("int8", 8), ("int4", 4)):
            expect = 0
            for rows, tk, tn in layer_matrices(cfg, g, phase).values():
                blocks = [{int(r) // 32 for r in rows[i: i + tk] if r >= 0} for i in range(0, len(rows), tk)]
                expect += math.ceil(tk * tn * bits / 8) + max(map(len, blocks)) * tn * 2
            expect += 2 * math.ceil(cfg.hidden_size / g) * 4
            assert quantized_layer_bytes(cfg, g, phase, fmt) == expect


def test_llama3_8b_at_4k_fits_one_wse2_only_quantised():
    cfg = get_model_preset("llama3-8b")
    with pytest.raises(PlacementError):
        plan(cfg, WSE2, 678, 544, 4096, prompt_len=3968, suggest=False)
    p = plan(cfg, WSE2, 678, 544, 4096, prompt_len=3968, suggest=False, weights="int8")
    assert p.prefill.whole_model_fits and p.decode.whole_model_fits
    assert p.kv_capacity_tokens >= 4096
    p4 = plan(cfg, WSE2, 678, 544, 4096, prompt_len=3968, suggest=False, weights="int4")
    assert p4.kv_capacity_tokens > p.kv_capacity_tokens


def test_band_spans_the_dequantising_ops():
    from waferllm.engine.band import corner

    fast, slow = corner(WSE2, False), corner(WSE2, True)
    assert (fast.ops_dequant_int8, slow.ops_dequant_int8) == WSE2.source_of("ops_dequant_int8").range
    assert (fast.ops_dequant_int4, slow.ops_dequant_int4) == WSE2.source_of("ops_dequant_int4").range


@pytest.mark.parametrize("tied", [True, False])
def test_an_fp16_run_rounds_every_table_once(tied):
    """An fp16 run's host weights: the layer matrices and the vocabulary tables rounded to
    fp16 once (what every tile holding them stores), a tied LM head still a view of the
    embedding table; an fp32 run's are the model's own."""
    from waferllm.models.loader import LoadedModel

    cfg = tiny_config(tie_word_embeddings=tied)
    w = random_weights(cfg, seed=2)
    model = LoadedModel(config=cfg, weights=w, tokenizer=None, path="")
    run = quant.weights_for_run(model, "fp16", "fp16")
    for got, want in ((run.embed, w.embed), (run.lm_head, w.lm_head), (run.layers[1].wq, w.layers[1].wq)):
        assert got.dtype == np.float16 and np.array_equal(got, want.astype(np.float16))
    assert (run.lm_head.base is run.embed) == tied
    assert quant.weights_for_run(model, "fp16", "fp32") is w
