"""Fused numerics (``numerics="fused"``, the default) against the primitive-by-primitive path.

A layer whose program has already run replays its cost and computes its values as dense
products (``waferllm.engine.fused``). The two paths must charge exactly the same costs,
store the same KV cache, and give the same logits to the rounding of a different summation
order, so the same greedy tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from waferllm.engine import fused
from waferllm.engine.run_config import RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.errors import RequestError
from waferllm.hardware import get_wafer
from waferllm.models.reference import ReferenceModel
from waferllm.models.testing import random_weights, tiny_config

WSE2 = get_wafer("wse2")

CASES = {
    "llama-gqa": (dict(), dict()),
    "qwen2-bias-mha": (dict(num_kv_heads=4, qkv_bias=True, arch="qwen2"), dict()),
    "tied-pipeline": (dict(num_layers=4, tie_word_embeddings=True), dict(prefill_grid=4, decode_grid=4)),
    "int4-streaming-concat": (dict(), dict(weights="int4", prefill_attention="streaming", kv_scheme="concat")),
    "concat": (dict(), dict(kv_scheme="concat")),
    "beyond-paper": (dict(), dict(decode_collectives="fused", gemv_ktree="tuned", gemv_overlap="segmented")),
}


def _run(cfg, w, numerics: str, grids=(8, 6), **run) -> dict:
    """Two requests (12 and 13 prompt tokens, 5 greedy steps each) on one placed model."""
    pg, dg = run.pop("prefill_grid", grids[0]), run.pop("decode_grid", grids[1])
    wm = WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=pg, decode_grid=dg, max_seq_len=64, numerics=numerics,
                                            **run))
    out = {"logits": [], "tokens": [], "metrics": []}
    for req in range(2):
        wm.reset()
        logits = wm.prefill((np.arange(12 + req) * 5 + 1) % cfg.vocab_size)
        out["logits"].append(logits[-1])
        for _ in range(5):
            tok = int(np.argmax(out["logits"][-1]))
            out["tokens"].append(tok)
            out["logits"].append(wm.decode(tok))
        out["metrics"].append(wm.request_metrics())
    out["kv"] = [st.cache.logical(layer) for st in wm.decode_stages for layer in range(len(st.layer_ids))]
    out["ledger"] = wm.ledger
    return out


def _close(a, b, rel=1e-9) -> None:
    """Costs summed in another order (a replay adds a whole layer at once): equal to rounding."""
    if isinstance(b, dict):
        assert a.keys() == b.keys()
        for k in b:
            _close(a[k], b[k], rel)
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, rel)
    elif isinstance(b, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-12)
    else:
        assert a == b


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_primitive_by_primitive(case, monkeypatch):
    over, run = CASES[case]
    cfg = tiny_config(**over)
    w = random_weights(cfg, seed=11)
    mesh = _run(cfg, w, "mesh", **dict(run))
    calls = {"prefill": 0, "decode": 0, "head": 0}
    for name, key in (("prefill_layer", "prefill"), ("decode_layer", "decode"), ("head_logits", "head")):
        orig = getattr(fused, name)

        def counted(*a, _orig=orig, _key=key, **k):
            calls[_key] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(fused, name, counted)
    fast = _run(cfg, w, "fused", **dict(run))
    # the fused path really ran: the second request's prefill layers, decode layers, LM heads
    assert calls["prefill"] >= cfg.num_layers and calls["decode"] > 0 and calls["head"] > 0
    # the same tokens; logits and every KV entry equal to the rounding of another summation order
    # (fp16 activations and KV entries: one fp16 rounding step, 1e-3 of the scale, at most)
    assert fast["tokens"] == mesh["tokens"]
    for a, b in zip(fast["logits"], mesh["logits"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * float(np.abs(b).max()))
    for (ka, va), (kb, vb) in zip(fast["kv"], mesh["kv"]):
        np.testing.assert_allclose(ka, kb, rtol=0, atol=2e-3 * max(1.0, float(np.abs(kb).max())))
        np.testing.assert_allclose(va, vb, rtol=0, atol=2e-3 * max(1.0, float(np.abs(vb).max())))
    # exactly the costs: the ledger's counters and per-primitive cycles, and both requests' reports
    la, lb = fast["ledger"], mesh["ledger"]
    _close([la.cycles, la.compute_cycles, la.comm_cycles, la.exposed_comm_cycles, la.overhead_cycles],
           [lb.cycles, lb.compute_cycles, lb.comm_cycles, lb.exposed_comm_cycles, lb.overhead_cycles])
    _close(dict(la.totals), dict(lb.totals))
    _close(dict(la.by_primitive), dict(lb.by_primitive))
    _close(fast["metrics"], mesh["metrics"])


def test_fused_layers_match_the_dense_reference():
    """Independent of the mesh: the fused run's logits against the numpy reference in fp32."""
    cfg = tiny_config()
    w = random_weights(cfg, seed=5)
    prompt = [3, 17, 99, 4, 250, 61, 7]
    ref = ReferenceModel(w)
    want = [ref.prefill(prompt)[-1]]
    tokens = [int(np.argmax(want[-1]))]
    for _ in range(4):
        want.append(ref.decode(tokens[-1]))
        tokens.append(int(np.argmax(want[-1])))
    wm = WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=8, decode_grid=6, max_seq_len=32, dtype="fp32"))
    for _ in range(2):  # the second request runs fused throughout
        wm.reset()
        got = [wm.prefill(prompt)[-1]]
        got += [wm.decode(t) for t in tokens[:-1]]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def test_batched_decode_fused_equals_mesh():
    """Two requests decoded as one batch, each with its own cache, fused or not."""
    cfg = tiny_config()
    w = random_weights(cfg, seed=2)
    outs = {}
    for numerics in ("mesh", "fused"):
        wm = WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=8, decode_grid=6, max_seq_len=32, max_num_seqs=2,
                                                numerics=numerics))
        seqs = [wm.open_seq(32), wm.open_seq(32)]
        first = wm.prefill_many([(s, [5 + s, 9, 2 * s + 1, 40], False) for s in seqs])
        toks = [int(np.argmax(lg[-1])) for lg in first]
        rows = []
        for _ in range(4):
            lg = wm.decode_batch(seqs, toks)
            rows.append(lg)
            toks = [int(t) for t in np.argmax(lg, axis=-1)]
        outs[numerics] = (np.stack(rows), wm.ledger.cycles)
    np.testing.assert_allclose(outs["fused"][0], outs["mesh"][0], rtol=0,
                               atol=2e-3 * float(np.abs(outs["mesh"][0]).max()))
    assert np.array_equal(outs["fused"][0].argmax(-1), outs["mesh"][0].argmax(-1))
    assert outs["fused"][1] == pytest.approx(outs["mesh"][1], rel=1e-9)


def test_numerics_is_checked():
    with pytest.raises(RequestError, match="numerics must be one of fused, mesh"):
        RunConfig(numerics="dense")


@pytest.mark.parametrize("attention", ["paper", "streaming"])
def test_prefill_program_depends_on_tile_rows_only(attention):
    """Why a prefill layer's replay is keyed by the prompt's tile rows: prompts that pad to
    the same tiles execute the same program (every cost, counter and high-water mark)."""
    import numpy as np

    from waferllm.engine.prefill import PrefillStage
    from waferllm.mesh.ledger import Ledger
    from waferllm.mesh.region import Region
    from waferllm.mesh.runtime import Mesh

    cfg = tiny_config(num_kv_heads=4, qkv_bias=True, arch="qwen2")

    def run(length):
        led = Ledger(WSE2, keep_events=False)
        mesh = Mesh(Region(WSE2, 6, 6), mode="dry", ledger=led)
        st = PrefillStage(mesh, cfg, range(1), [None], range(6), None, None, None, "fp16", 2, "fp16", attention)
        h = mesh.place((length, cfg.hidden_size), ("y", "x"), "fp16", name="hidden")
        mark = led.mark(per_primitive=True)
        st.layer(0, h, length, st.rope_tables(np.arange(length)))
        return led.since(mark), mesh.sram.peak_bytes, mesh.routes.peak

    same = run(13)  # 3 tile rows on 6 PE rows, as 17 and 18 tokens
    assert run(17) == same and run(18) == same
    assert run(19)[0]["cycles"] > same[0]["cycles"]  # a fourth tile row costs more


def test_replayed_layers_raise_the_sram_peak_as_executed_ones():
    """A replay also replays the program's SRAM high-water marks from what the region holds
    then: a dry run (every layer but one replayed) peaks where the numeric run executing
    every layer on the mesh does; later prefill layers start with more K/V held."""
    cfg = tiny_config(num_layers=6)
    w = random_weights(cfg, seed=1)
    peaks = {}
    for mode in ("numeric", "dry"):
        run = RunConfig(prefill_grid=4, decode_grid=4, max_seq_len=40, numerics="mesh")
        wm = WaferModel(cfg, w if mode == "numeric" else None, WSE2, run, mode=mode)
        wm.reset()
        wm.prefill(np.arange(20) if mode == "numeric" else 20)
        assert [len(s.layer_ids) for s in wm.prefill_stages] == [3, 3]  # several layers per region
        peaks[mode] = wm.request_metrics()["sram_peak_bytes_per_pe"]
    assert peaks["dry"] == peaks["numeric"]


def test_round_fp16_is_numpys_fp16_cast():
    """The fused path's fp16 rounding equals numpy's float16 cast bit for bit: normal values,
    ties, subnormals, overflow to infinity, signed zeros, infinities and NaN."""
    rng = np.random.default_rng(0)
    x = (rng.choice([-1, 1], 200_000) * 2.0 ** rng.uniform(-30, 18, 200_000)).astype(np.float32)
    mant = rng.integers(0, 2 ** 23, 20_000, dtype=np.uint32) & ~np.uint32(0x1FFF)
    exp = rng.integers(100, 142, 20_000, dtype=np.uint32)
    ties = ((exp << 23) | mant | np.uint32(0x1000)).view(np.float32)  # exactly half an fp16 step
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 65536, 2.0 ** -14,
                      2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, -6.1e-5], np.float32)
    x = np.concatenate([x, ties, -ties, edges])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    got = fused.round_fp16(x)
    assert np.array_equal(got.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])
    assert np.isnan(got[np.isnan(want)]).all()
    # arrays without a subnormal, overflowing or NaN value take the bit rounding alone; zeros
    # (masked probabilities, padding) are among them
    for part in (x[(np.abs(x) >= 2.0 ** -14) & (np.abs(x) < 65504)], np.zeros(7, np.float32),
                 np.array([0.0, -0.0, 1.0, 65504, 2.0 ** -14, -(2.0 ** -14)], np.float32)):
        assert np.array_equal(fused.round_fp16(part).view(np.uint32),
                              part.astype(np.float16).astype(np.float32).view(np.uint32))


def test_a_replay_that_would_overflow_sram_raises_as_executing_does():
    """A program recorded at one SRAM level and replayed at a higher one (here: the K/V of more
    prompts held until the transition) overflows exactly when executing it would."""
    from waferllm.errors import SRAMOverflowError

    cfg = tiny_config(num_layers=5)
    w = random_weights(cfg, seed=3)
    wafer = WSE2.replace(rows=20, cols=20, sram_bytes_per_pe=28 * 1024)
    for requests, fits in ((29, True), (30, False)):
        for numerics in ("mesh", "fused"):
            wm = WaferModel(cfg, w, wafer, RunConfig(prefill_grid=4, decode_grid=4, max_seq_len=48, numerics=numerics))
            prompts = [(0, (np.arange(47) * 3 + i) % cfg.vocab_size, False) for i in range(requests)]
            if fits:
                wm.prefill_many(prompts)
            else:
                with pytest.raises(SRAMOverflowError, match="SRAM overflow on region prefill"):
                    wm.prefill_many(prompts)


def test_concat_regions_of_one_size_with_different_layer_counts_keep_their_own_peaks():
    """A concat cache grows by one slot of every layer its region holds: regions of one size
    holding 3 and 2 layers replay their own last layer's growth (per-region peaks as executed)."""
    cfg = tiny_config(num_layers=5)
    w = random_weights(cfg, seed=3)
    wafer = WSE2.replace(rows=20, cols=20, sram_bytes_per_pe=28 * 1024)
    peaks = {}
    for numerics in ("mesh", "fused"):
        # a 12-token prompt and 9 output tokens: the concat budget holds the bottom row's 3 + 8 slots
        wm = WaferModel(cfg, w, wafer, RunConfig.for_request(12, 9, prefill_grid=4, decode_grid=4, kv_scheme="concat",
                                                             numerics=numerics))
        assert [len(s.layer_ids) for s in wm.decode_stages] == [3, 2]
        wm.reset()
        logits = wm.prefill(np.arange(12) % cfg.vocab_size)
        tok = int(np.argmax(logits[-1]))
        for _ in range(8):
            tok = int(np.argmax(wm.decode(tok)))
        peaks[numerics] = [s.mesh.sram.peak_bytes for s in wm.decode_stages]
    assert peaks["fused"] == peaks["mesh"]
