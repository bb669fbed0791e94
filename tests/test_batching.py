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


# ---- the engine: batched greedy tokens equal each request alone -------------------------------

from waferllm import LLM, SamplingParams  # noqa: E402
from waferllm.engine.run_config import RunConfig  # noqa: E402
from waferllm.engine.scheduler import QueueFullError, Scheduler  # noqa: E402
from waferllm.engine.wafer import WaferModel  # noqa: E402
from waferllm.models.testing import tiny_config  # noqa: E402

PROMPTS = ["The capital of France is", "Wafer-scale chips are", "1, 2, 3, 4,", "The quick brown fox"]


@pytest.fixture(scope="module")
def smol_llm(smollm):
    # four decode regions: micro-batches pipelined over them
    return LLM(smollm, wafer="wse2", prefill_grid=28, decode_grid=28, max_model_len=64, band=False, max_num_seqs=4)


def test_batched_greedy_tokens_equal_each_request_alone(smol_llm):
    sp = SamplingParams(max_tokens=6, temperature=0)
    alone = [smol_llm.generate(p, sp)[0] for p in PROMPTS]
    together = smol_llm.generate(PROMPTS, sp)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.text for o in together] == [o.text for o in alone]
    assert all(o.metrics["batched"] == 4 for o in together)
    # admitted together, prefilled one after another: each waits for the previous one's first token
    assert together[0].metrics["queue_s"] == 0
    for prev, nxt in zip(together, together[1:]):
        assert nxt.metrics["queue_s"] == pytest.approx(prev.metrics["ttft_s"], rel=1e-9)


def test_continuous_batching_admits_between_steps_and_frees_kv(smol_llm):
    """A request that arrives while others decode joins the running batch at the next step;
    every finished request's KV reservation is returned to the pool."""
    sp = SamplingParams(max_tokens=5, temperature=0)
    alone = {p: smol_llm.generate(p, sp)[0].token_ids for p in PROMPTS[:3]}
    sched = Scheduler(smol_llm, max_num_seqs=4, max_waiting=4)
    a = sched.add_request(smol_llm.encode_prompt(PROMPTS[0])[1], sp)
    b = sched.add_request(smol_llm.encode_prompt(PROMPTS[1])[1], sp)
    tokens: dict = {a: [], b: []}
    for ev in sched.step() + sched.step():
        tokens[ev.request_id] += ev.token_ids
    # the first step prefills (first token) and decodes (second), the next decodes again
    assert sched.num_running == 2 and all(len(t) == 3 for t in tokens.values())
    c = sched.add_request(smol_llm.encode_prompt(PROMPTS[2])[1], sp)
    tokens[c] = []
    outs = {}
    while sched.has_unfinished():
        for ev in sched.step():
            tokens[ev.request_id] += ev.token_ids
            if ev.finished:
                outs[ev.request_id] = ev.output
    assert [tokens[r] for r in (a, b, c)] == [alone[p] for p in PROMPTS[:3]]
    assert [outs[r].token_ids for r in (a, b, c)] == [alone[p] for p in PROMPTS[:3]]
    assert sched.reserved == 0 and sched.kv_cache_usage == 0
    # the late request queued behind a wafer that was busy decoding the first two
    assert outs[c].metrics["wafer"]["ttft_s"] > 0


def test_queue_bound_and_abort(smol_llm):
    sp = SamplingParams(max_tokens=4, temperature=0)
    ids = smol_llm.encode_prompt(PROMPTS[0])[1]
    sched = Scheduler(smol_llm, max_num_seqs=2, max_waiting=2)
    r0, r1 = sched.add_request(ids, sp), sched.add_request(ids, sp)
    with pytest.raises(QueueFullError, match="already waiting"):
        sched.add_request(ids, sp)
    sched.abort(r1)
    events = sched.step()
    [aborted] = [e for e in events if e.request_id == r1]
    assert aborted.finished and aborted.output.finish_reason == "abort" and aborted.output.token_ids == []
    done = sched.run_to_completion()
    assert len(done[r0].token_ids) == 4 and sched.reserved == 0


def test_pipelined_micro_batches_overlap_on_the_decode_regions():
    """Four requests on four decode regions: a step costs less than four single steps (the
    micro-batches occupy different regions at once) and more than one (the LM head spans every
    region); each request's token is picked when its own micro-batch's head ends."""
    cfg = tiny_config(name="pipe", num_layers=4)
    run = RunConfig(prefill_grid=8, decode_grid=8, max_seq_len=32, dtype="fp32", max_num_seqs=4)
    small = WAFER.replace(sram_bytes_per_pe=17_000)  # one layer per region
    wm = WaferModel(cfg, None, small, run, mode="dry")
    assert len(wm.decode_stages) == 4
    wm.close_seq(0)
    seqs = [wm.open_seq(16) for _ in range(4)]
    wm.prefill_many([(s, 8, False) for s in seqs])
    led = wm.ledger
    t0 = led.cycles
    wm.decode_batch(seqs[:1], [None])
    single = led.cycles - t0
    t0 = led.cycles
    wm.decode_batch(seqs, [None] * 4)
    four = led.cycles - t0
    assert single < four < 4 * single
    ends = [wm.token_cycles[s] for s in seqs]
    assert ends == sorted(ends) and len(set(ends)) == 4 and ends[-1] == pytest.approx(led.cycles)


def test_beyond_paper_algorithms_keep_smollm2_greedy_tokens(smollm, smol_llm):
    """Streaming prefill attention, fused decode collectives and tuned K-trees, all at once:
    the same greedy tokens as the paper's design, and a faster decode step."""
    sp = SamplingParams(max_tokens=6, temperature=0)
    beyond = LLM(smollm, wafer="wse2", prefill_grid=28, decode_grid=28, max_model_len=64, band=False, max_num_seqs=4,
                 prefill_attention="streaming", decode_collectives="fused", gemv_ktree="tuned")
    for p in PROMPTS[:2]:
        a, b = smol_llm.generate(p, sp)[0], beyond.generate(p, sp)[0]
        assert a.token_ids == b.token_ids
        assert b.metrics["tpot_s"] < a.metrics["tpot_s"]
