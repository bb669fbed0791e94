"""The wafer engine computes the model: logits match the dense numpy reference.

Random-weight tiny models of every attention shape (GQA, MHA, MQA, Qwen2 biases, tied
and untied embeddings, head/hidden/FFN/vocab sizes that do not divide the grid) run
numerically on small grids, prefill (all prompt rows) and every decode step compared
with :class:`ReferenceModel`; the shift and concat KV schemes give the same logits;
fp16 stays close; SmolLM2 greedy generation matches the reference token for token;
and the ``LLM`` API returns vLLM-shaped outputs with the wafer metrics.
"""

from __future__ import annotations

import numpy as np
import pytest

from waferllm.engine.llm import LLM
from waferllm.engine.run_config import RunConfig
from waferllm.engine.sampling import SamplingParams
from waferllm.engine.wafer import WaferModel
from waferllm.errors import RequestError
from waferllm.hardware import get_wafer
from waferllm.models.reference import ReferenceModel
from waferllm.models.testing import random_weights, tiny_config

WSE2 = get_wafer("wse2")
#: more SRAM per PE, so that tiny models in fp32 fit 3x3 regions
BIG = WSE2.replace(sram_bytes_per_pe=96 * 1024)

CONFIGS = {
    # 4 query heads sharing 2 kv heads
    "gqa": dict(),
    "mha": dict(num_kv_heads=4),
    "mqa": dict(num_kv_heads=1),
    "qwen2_bias": dict(arch="qwen2", qkv_bias=True, num_kv_heads=2),
    "tied": dict(tie_word_embeddings=True),
    # nothing divides anything: hidden 60, 6 heads of 10 (3 kv heads), FFN 100, vocab 263
    "odd": dict(hidden_size=60, num_heads=6, num_kv_heads=3, head_dim=10, intermediate_size=100, vocab_size=263),
}
GRIDS = (3, 4, 5, 7)
PROMPT = [3, 17, 99, 5, 200, 7, 1, 44, 9, 130, 61]
STEPS = 6
FP32_TOL = 1e-4  # relative to the reference logit scale


def _model(name: str, **extra):
    cfg = tiny_config(name=name, **{**CONFIGS[name], **extra})
    return cfg, random_weights(cfg, seed=hash(name) % 1000)


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def run_wafer(cfg, w, prefill_grid, decode_grid, kv_scheme="shift", dtype="fp32", prompt=PROMPT, steps=STEPS,
              wafer=BIG, tokens=None, **algorithms):
    """Prefill logits [T, V] and the logits of each decode step (tokens: teacher-forced, else greedy)."""
    run = RunConfig(prefill_grid, decode_grid, max_seq_len=len(prompt) + steps + 4, dtype=dtype, kv_scheme=kv_scheme,
                    **algorithms)
    wm = WaferModel(cfg, w, wafer, run, mode="numeric")
    wm.reset()
    pre = wm.prefill(prompt, prompt_logits=True)
    dec, tok = [], int(np.argmax(pre[-1]))
    for i in range(steps):
        t = tokens[i] if tokens is not None else tok
        lg = wm.decode(t)
        dec.append(lg)
        tok = int(np.argmax(lg))
    return wm, pre, dec


def run_reference(w, prompt=PROMPT, tokens=None, steps=STEPS):
    ref = ReferenceModel(w, max_seq_len=len(prompt) + steps + 4)
    pre = ref.prefill(prompt)
    dec, tok, used = [], int(np.argmax(pre[-1])), []
    for i in range(steps):
        t = tokens[i] if tokens is not None else tok
        used.append(t)
        lg = ref.decode(t)
        dec.append(lg)
        tok = int(np.argmax(lg))
    return pre, dec, used


@pytest.fixture(scope="module")
def models():
    return {name: _model(name) for name in CONFIGS}


@pytest.fixture(scope="module")
def references(models):
    return {name: run_reference(w) for name, (cfg, w) in models.items()}


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_matches_reference_both_kv_schemes(models, references, name, grid):
    cfg, w = models[name]
    ref_pre, ref_dec, tokens = references[name]
    out = {}
    for scheme in ("shift", "concat"):
        _, pre, dec = run_wafer(cfg, w, grid, grid, kv_scheme=scheme, tokens=tokens)
        assert pre.shape == (len(PROMPT), cfg.vocab_size)
        assert _rel(pre, ref_pre) < FP32_TOL, f"{name} grid {grid} {scheme}: prefill"
        for i, (a, b) in enumerate(zip(dec, ref_dec)):
            assert a.shape == (cfg.vocab_size,)
            assert _rel(a, b) < FP32_TOL, f"{name} grid {grid} {scheme}: decode step {i}"
        out[scheme] = (pre, dec)
    # the two cache schemes hold the same tokens in different slots: identical logits
    # (up to the order of the fp32 sums over slots)
    np.testing.assert_array_equal(out["shift"][0], out["concat"][0])
    for a, b in zip(out["shift"][1], out["concat"][1]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.max(np.abs(b)))
        assert int(np.argmax(a)) == int(np.argmax(b))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_collectives_and_tuned_ktree_match_reference(models, references, name):
    """Decode beyond the paper (RMSNorm statistics riding the GEMV's reduce, one collective
    for softmax and P V, K-trees chosen per reduction) computes the same logits."""
    cfg, w = models[name]
    ref_pre, ref_dec, tokens = references[name]
    _, _, dec = run_wafer(cfg, w, 4, 5, tokens=tokens, decode_collectives="fused", gemv_ktree="tuned")
    for i, (a, b) in enumerate(zip(dec, ref_dec)):
        assert _rel(a, b) < FP32_TOL, f"{name}: decode step {i}"
        assert int(np.argmax(a)) == int(np.argmax(b))


@pytest.mark.parametrize("prefill_grid,decode_grid", [(5, 3), (3, 7), (4, 6), (7, 4)])
def test_different_prefill_and_decode_grids(models, references, prefill_grid, decode_grid):
    """The transition re-places the KV cache between two different layouts."""
    for name in ("gqa", "odd"):
        cfg, w = models[name]
        ref_pre, ref_dec, tokens = references[name]
        _, pre, dec = run_wafer(cfg, w, prefill_grid, decode_grid, tokens=tokens)
        assert _rel(pre, ref_pre) < FP32_TOL
        for a, b in zip(dec, ref_dec):
            assert _rel(a, b) < FP32_TOL


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_of_regions_and_vocab_slices(tied):
    """4 layers in fp32 on 4x4 regions of the real wse2 need two regions per phase:
    layers run as a pipeline and the LM head (and embedding) are sliced by vocabulary."""
    cfg = tiny_config(name="deep", num_layers=4, tie_word_embeddings=tied)
    w = random_weights(cfg, seed=7)
    ref_pre, ref_dec, tokens = run_reference(w)
    wm, pre, dec = run_wafer(cfg, w, 4, 4, tokens=tokens, wafer=WSE2)
    assert len(wm.prefill_stages) >= 2 and len(wm.decode_stages) >= 2
    assert wm.plan.decode.layers_per_region < cfg.num_layers
    assert _rel(pre, ref_pre) < FP32_TOL
    for a, b in zip(dec, ref_dec):
        assert _rel(a, b) < FP32_TOL


def test_one_token_prompt_and_reset_between_requests(models):
    cfg, w = models["gqa"]
    ref_pre, ref_dec, tokens = run_reference(w, prompt=[42])
    wm, pre, dec = run_wafer(cfg, w, 4, 5, prompt=[42], tokens=tokens)
    assert _rel(pre, ref_pre) < FP32_TOL
    for a, b in zip(dec, ref_dec):
        assert _rel(a, b) < FP32_TOL
    # a second request on the same model starts from an empty cache (its layers now replay
    # their cost and run fused numerics: the same values to fp32 rounding)
    wm.reset()
    again = wm.prefill([42])
    np.testing.assert_allclose(again, pre, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(wm.decode(tokens[0]), dec[0], rtol=1e-5, atol=1e-6)


def test_last_row_only_when_prompt_logits_not_wanted(models):
    cfg, w = models["gqa"]
    wm = WaferModel(cfg, w, BIG, 5, 5, max_seq_len=32, mode="numeric", dtype="fp32")
    wm.reset()
    last = wm.prefill(PROMPT)
    ref = ReferenceModel(w).prefill(PROMPT)
    assert last.shape == (1, cfg.vocab_size)
    assert _rel(last[0], ref[-1]) < FP32_TOL


@pytest.mark.parametrize("name", ["gqa", "mqa", "qwen2_bias", "odd"])
def test_fp16_stays_close(models, references, name):
    cfg, w = models[name]
    ref_pre, ref_dec, tokens = references[name]
    _, pre, dec = run_wafer(cfg, w, 5, 4, dtype="fp16", tokens=tokens)
    assert _rel(pre, ref_pre) < 2e-2
    for a, b in zip(dec, ref_dec):
        assert _rel(a, b) < 2e-2


def test_numeric_run_rejects_bad_requests(models):
    cfg, w = models["gqa"]
    with pytest.raises(RequestError, match="a numeric run needs weights"):
        WaferModel(cfg, None, BIG, 4, 4, max_seq_len=16, mode="numeric")
    wm = WaferModel(cfg, w, BIG, 4, 4, max_seq_len=8, mode="numeric", dtype="fp32")
    wm.reset()
    with pytest.raises(RequestError, match="at least one token"):
        wm.prefill([])
    with pytest.raises(RequestError, match=rf"token id out of range \[0, {cfg.vocab_size}\)"):
        wm.prefill([cfg.vocab_size])
    with pytest.raises(RequestError, match="prompt of 8 tokens leaves no room in the planned 8-token context"):
        wm.prefill(list(range(8)))  # no room left to generate
    wm.prefill(list(range(7)))
    with pytest.raises(RequestError, match="token id -1 out of range"):
        wm.decode(-1)
    wm.decode(1)
    with pytest.raises(RequestError, match="context of 8 tokens is full"):
        wm.decode(2)  # the context of 8 tokens is full


# ------------------------------------------------------------------ SmolLM2 (embedded)

SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
#: fp32 SmolLM2 needs 28x28 regions on a real wse2; more SRAM per PE lets 12x12 hold it
SMOL_WAFER = WSE2.replace(sram_bytes_per_pe=200_000)


def _greedy_reference(ref: ReferenceModel, prompt_ids, tokens):
    """Teacher-forced on ``tokens``: the reference logits before each of them."""
    ref.reset()
    out = [ref.prefill(prompt_ids)[-1]]
    for t in tokens[:-1]:
        out.append(ref.decode(t))
    return out


@pytest.fixture(scope="module")
def smol_ref(smollm):
    return ReferenceModel(smollm.weights, max_seq_len=64)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_smollm2_greedy_matches_reference(smollm, smol_ref, dtype):
    llm = LLM(smollm, wafer=SMOL_WAFER, prefill_grid=12, decode_grid=12, dtype=dtype, max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for prompt in SMOL_PROMPTS:
        out = llm.generate(prompt, params)[0]
        assert len(out.token_ids) == 16
        ref_logits = _greedy_reference(smol_ref, out.prompt_token_ids, out.token_ids)
        for i, (tok, lg) in enumerate(zip(out.token_ids, ref_logits)):
            if tok == int(np.argmax(lg)):
                continue
            # fp32 must never diverge; fp16 only where the reference itself nearly ties
            top2 = np.sort(lg)[-2:]
            assert dtype == "fp16", f"fp32 greedy diverged at token {i}"
            assert top2[1] - top2[0] < 1e-2, f"fp16 diverged at token {i} without a near-tie ({top2[1] - top2[0]:.4f})"
            assert lg[tok] == top2[0], "the wafer picked the reference's runner-up"
            break  # after a (legitimate) divergence the continuations differ


def test_smollm2_fp32_logits_match_reference(smollm, smol_ref):
    llm = LLM(smollm, wafer=SMOL_WAFER, prefill_grid=12, decode_grid=11, dtype="fp32", max_model_len=64)
    ids = llm.tokenizer.encode(SMOL_PROMPTS[0], add_special_tokens=True)
    wm = llm.backend
    wm.reset()
    pre = wm.prefill(ids, prompt_logits=True)
    smol_ref.reset()
    ref_pre = smol_ref.prefill(ids)
    assert _rel(pre, ref_pre) < FP32_TOL
    tok = int(np.argmax(ref_pre[-1]))
    for _ in range(3):
        a, b = wm.decode(tok), smol_ref.decode(tok)
        assert _rel(a, b) < FP32_TOL
        tok = int(np.argmax(b))


def test_smollm2_default_wafer_grid_28(smollm, smol_ref):
    """On the real wse2 SRAM, fp32 SmolLM2 fits 28x28 regions and decodes the reference's tokens."""
    llm = LLM(smollm, wafer="wse2", prefill_grid=28, decode_grid=28, dtype="fp32", max_model_len=48)
    out = llm.generate(SMOL_PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    ref_logits = _greedy_reference(smol_ref, out.prompt_token_ids, out.token_ids)
    assert out.token_ids == [int(np.argmax(lg)) for lg in ref_logits]


# ------------------------------------------------------------------ the LLM API


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from waferllm.models.loader import load_model
    from waferllm.models.testing import write_hf_checkpoint

    cfg = tiny_config(name="tiny-hf")
    d = write_hf_checkpoint(str(tmp_path_factory.mktemp("tiny_hf")), random_weights(cfg, seed=3))
    return LLM(load_model(d), wafer=BIG, prefill_grid=4, decode_grid=5, dtype="fp32", max_model_len=40)


def test_llm_metrics_are_the_ledger_figures_of_the_request(tiny_llm):
    """The request's metrics, recomputed from the wafer's ledger (its events) and the plan."""
    llm = tiny_llm
    out = llm.generate("hello wafer", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    m, wm = out.metrics, llm.backend
    assert out.num_generated == 5 and out.finish_reason == "length"
    sec = llm.wafer.cycles_to_seconds
    # every event of the request sits under one phase span; the phases' cycles are the times
    begin = wm.request_mark["cycles"]  # where this request started on the critical path
    phase = {"prefill": 0.0, "transition": 0.0, "decode": 0.0}
    for path, start, end in wm.ledger.spans:
        if len(path) == 1 and path[0] in phase and start >= begin:
            phase[path[0]] += end - start
    assert m["ttft_s"] == pytest.approx(sec(phase["prefill"]), rel=1e-12)
    assert m["transition_s"] == pytest.approx(sec(phase["transition"]), rel=1e-12)
    # 5 tokens: the first from the prefill logits, then 4 decode steps
    assert m["tpot_s"] == pytest.approx(sec(phase["decode"]) / 4, rel=1e-12)
    assert m["decode_tokens_per_s"] == pytest.approx(4 / sec(phase["decode"]), rel=1e-12)
    total = sec(sum(phase.values()))
    assert m["e2e_tokens_per_s"] == pytest.approx(5 / total, rel=1e-12)
    assert m["prefill_tokens_per_s"] == pytest.approx(len(out.prompt_token_ids) / m["ttft_s"], rel=1e-12)
    # flops: every charged event's flops (the ledger keeps them all in a numeric run)
    flops = sum(e.counters.get("flops", 0.0) for e in wm.ledger.events if e.start >= begin)
    assert m["flops"] == pytest.approx(flops, rel=1e-12)
    # the shift-based cache fills every PE row of the one decode region evenly, the
    # concatenation cache one row: Q times fewer tokens; either way the context fits
    [decode] = wm.decode_stages
    assert m["kv_capacity_tokens"] == decode.mesh.rows * m["kv_capacity_tokens_concat"]
    assert m["kv_capacity_tokens"] >= llm.max_model_len
    assert m["sram_peak_bytes_per_pe"]["decode"] == max(s.mesh.sram.peak_bytes for s in wm.decode_stages)
    assert m["host"]["placement_wall_s"] <= m["host"]["wall_s"]


def test_llm_greedy_equals_reference(tiny_llm):
    out = tiny_llm.generate("abc", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    ref = ReferenceModel(tiny_llm.model.weights)
    logits = _greedy_reference(ref, out.prompt_token_ids, out.token_ids)
    assert out.token_ids == [int(np.argmax(lg)) for lg in logits]


def test_llm_logprobs_like_vllm(tiny_llm):
    out = tiny_llm.generate("xyz", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2,
                                                  prompt_logprobs=1))[0]
    assert isinstance(out.logprobs, list) and len(out.logprobs) == len(out.token_ids)
    for tok, d in zip(out.token_ids, out.logprobs):
        assert isinstance(d, dict) and tok in d and 2 <= len(d) <= 3
        assert all(isinstance(k, int) and v <= 0 for k, v in d.items())
        assert d[tok] == max(d.values())  # greedy: the sampled token is the most likely
    # prompt_logprobs: None for the first prompt token, then a dict holding the actual token
    pl = out.prompt_logprobs
    assert len(pl) == len(out.prompt_token_ids) and pl[0] is None
    for tok, d in zip(out.prompt_token_ids[1:], pl[1:]):
        assert tok in d


def test_llm_rejects_prompt_plus_max_tokens_beyond_max_model_len(tiny_llm):
    with pytest.raises(RequestError, match="max_model_len"):
        tiny_llm.generate("hello", SamplingParams(max_tokens=tiny_llm.max_model_len))
