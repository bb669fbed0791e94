"""Speculative decoding: the verification pass, KV rollback, draft placement and the decoder.

Independent checks: a verification pass's logits against decoding the same tokens one at a
time and against the dense numpy reference; a rolled-back cache against a fresh run that
never saw the rejected tokens; greedy and (exact match) seeded sampled tokens against plain
decoding; rejection-sampled tokens against the target's own distribution, enumerated by
decoding every prefix without a draft; dry-run round counts against the acceptance pattern
worked out by hand; draft regions against a brute-force occupancy mask.
"""

from __future__ import annotations

import numpy as np
import pytest

from waferllm.engine.generate import generate_one
from waferllm.engine.run_config import RunConfig
from waferllm.engine.sampling import Sampler, SamplingParams
from waferllm.engine.speculative import (SpeculativeConfig, first_layers, free_rectangles, place_draft,
                                         speculative_backend)
from waferllm.engine.wafer import WaferModel
from waferllm.errors import PlacementError, RequestError
from waferllm.hardware import get_wafer
from waferllm.mesh.region import Region
from waferllm.models.presets import get_model_preset
from waferllm.models.reference import ReferenceModel
from waferllm.models.testing import byte_tokenizer, random_weights, tiny_config

WSE2 = get_wafer("wse2")
PROMPT = np.arange(1, 10)
# llama3-8b with int8 weights, both phases on 360x360 regions: a 1B draft fits beside it
_EIGHT_B = RunConfig.for_request(512, 64, prefill_grid=360, decode_grid=360, weights="int8")


def _model(cfg, w, numerics="fused", scheme="shift", dg=4, **run):
    wm = WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=8, decode_grid=dg, max_seq_len=48, numerics=numerics,
                                            kv_scheme=scheme, speculative_tokens=5, **run))
    wm.reset()
    wm.prefill(PROMPT)
    return wm


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(num_layers=3)
    return cfg, random_weights(cfg, scale=0.3)


@pytest.mark.parametrize("numerics", ["fused", "mesh"])
@pytest.mark.parametrize("scheme", ["shift", "concat"])
def test_verify_pass_equals_decoding_one_at_a_time(tiny, numerics, scheme):
    cfg, w = tiny
    seq = [5, 9, 11, 20, 3]
    one = _model(cfg, w, numerics, scheme)
    ref = np.stack([one.decode(t) for t in seq])
    many = _model(cfg, w, numerics, scheme)
    out = many.verify(0, seq)
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() < 1e-4 * scale
    # and against the dense reference on the same weights (independent of the mesh)
    ref_model = ReferenceModel(w)
    ref_model.prefill(PROMPT)
    dense = np.stack([ref_model.decode(t) for t in seq])
    assert np.abs(out - dense).max() < 2e-2 * scale
    assert many.position == one.position == len(PROMPT) + len(seq)


@pytest.mark.parametrize("scheme", ["shift", "concat"])
@pytest.mark.parametrize("keep", [0, 1, 3])
def test_rollback_leaves_the_cache_of_a_run_that_never_saw_the_rejected(tiny, scheme, keep):
    cfg, w = tiny
    seq = [5, 9, 11, 20, 3]
    spec = _model(cfg, w, "mesh", scheme)
    spec.verify(0, [7] + seq)
    spec.rollback(0, len(seq) - keep)
    fresh = _model(cfg, w, "mesh", scheme)
    fresh.verify(0, [7] + seq[:keep]) if keep else fresh.decode(7)
    for a, b in zip(spec.decode_stages, fresh.decode_stages):
        ca, cb = a.cache, b.cache
        assert (ca.count == cb.count).all() and (ca.head == cb.head).all()
        for layer in range(ca.layers):
            for x, y in zip(ca.logical(layer), cb.logical(layer)):
                # the same entries, to fp16 rounding (a batched product sums in its own order)
                np.testing.assert_allclose(x, y, rtol=2e-3, atol=2e-3)
    # decoding on from there gives what the fresh run gives
    a, b = spec.decode(42), fresh.decode(42)
    assert np.abs(a - b).max() < 2e-3 * np.abs(b).max()


def test_rollback_charges_the_inverse_shift():
    """The shift cache on 4 rows: when the 10th token came to 9 (rows [2, 2, 2, 3]), the
    bottom row handed its oldest up to row 2; dropping it moves that token back down: one
    message from each of row 2's 4 PEs, one token's K and V of every layer."""
    cfg = tiny_config(num_layers=2)
    wm = WaferModel(cfg, None, WSE2, RunConfig(prefill_grid=None, decode_grid=4, max_seq_len=32), mode="dry")
    wm.start_decode(9)
    wm.decode(None)
    cache = wm.decode_stages[0].cache
    mark = wm.ledger.mark(per_primitive=True)
    wm.rollback(0, 1)
    delta = wm.ledger.since(mark)
    hl = cache.hl
    assert delta["messages"] == 4
    assert delta["bytes_moved"] == 4 * 2 * hl.col_features * 2 * cfg.num_layers
    assert list(cache.count) == [2, 2, 2, 3] and wm.positions[0] == 9


def test_dry_verify_costs_what_a_numeric_one_does(tiny):
    cfg, w = tiny
    costs = []
    for mode in ("numeric", "dry"):
        wm = WaferModel(cfg, w if mode == "numeric" else None, WSE2,
                        RunConfig(prefill_grid=8, decode_grid=4, max_seq_len=48, numerics="mesh", speculative_tokens=2),
                        mode=mode)
        wm.reset()
        wm.prefill(PROMPT if mode == "numeric" else len(PROMPT))
        mark = wm.ledger.mark()
        for _ in range(2):  # the second pass of the same shape replays in the dry run
            wm.verify(0, [3, 4, 5] if mode == "numeric" else [None] * 3)
            wm.rollback(0, 1)
        costs.append(wm.ledger.since(mark))
    for key in ("cycles", "messages", "bytes_moved", "flops"):
        assert costs[0][key] == pytest.approx(costs[1][key], rel=1e-9), key


def test_a_verify_pass_costs_less_than_its_tokens_one_at_a_time():
    """The point of a verification pass: one decode step carries T tokens (every collective
    once, carrying T rows), so it is cheaper than T steps, though dearer than one."""
    cfg = get_model_preset("llama3-8b")
    wm = WaferModel(cfg, None, WSE2, RunConfig.for_request(256, 32, prefill_grid=None, decode_grid=360,
                                                           speculative_tokens=4, weights="int8"), mode="dry")
    wm.start_decode(256)
    step = wm.ledger.cycles
    wm.decode(None)
    step = wm.ledger.cycles - step
    before = wm.ledger.cycles
    wm.verify(0, [None] * 5)
    verify = wm.ledger.cycles - before
    assert step < verify < 3 * step


# ---------------------------------------------------------------------------- the decoder


def _backend(cfg, w, draft_layers, k, method="rejection", ahead=False, dg=4):
    target = WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=8, decode_grid=dg, max_seq_len=64, speculative_tokens=k))
    return speculative_backend(target, SpeculativeConfig(num_speculative_tokens=k, draft_layers=draft_layers,
                                                         acceptance_method=method, draft_ahead=ahead))


def _speculate(cfg, w, draft_layers, k, params, method="rejection", dg=4):
    return generate_one(_backend(cfg, w, draft_layers, k, method, dg=dg), byte_tokenizer(), list(range(1, 12)), params)


@pytest.mark.parametrize("draft_layers,k,method", [(1, 3, "rejection"), (2, 2, "rejection"), (2, 5, "rejection"),
                                                   (2, 5, "exact")])
def test_greedy_tokens_are_the_targets_own(tiny, draft_layers, k, method):
    """At temperature 0 both methods are greedy decoding: the target's own tokens."""
    cfg, w = tiny
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = generate_one(WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=8, decode_grid=4, max_seq_len=64)),
                         byte_tokenizer(), list(range(1, 12)), params)
    spec = _speculate(cfg, w, draft_layers, k, params, method)
    assert spec.token_ids == plain.token_ids
    s = spec.metrics["backend"]["speculative"]
    # every emitted token after the first is a round's own token or an accepted draft
    assert s["rounds"] + s["accepted"] == len(spec.token_ids) - 1
    assert s["accepted"] <= s["drafted"] <= k * s["rounds"]


def test_seeded_sampling_draws_the_same_tokens(tiny):
    """Exact-match verification samples every token from the target's logits for its own
    prefix, with the request's generator in the same order: the same seed, the same tokens."""
    cfg, w = tiny
    params = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    plain = generate_one(WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=8, decode_grid=4, max_seq_len=64)),
                         byte_tokenizer(), list(range(1, 12)), params)
    assert _speculate(cfg, w, 2, 3, params, "exact").token_ids == plain.token_ids


def test_a_perfect_draft_takes_every_guess(tiny):
    """A draft of all the target's layers but one guesses well; the same model as its own
    draft (all layers) would accept everything: check the count with the target itself."""
    cfg, w = tiny
    target = WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=8, decode_grid=4, max_seq_len=64, speculative_tokens=3))
    draft = place_draft(cfg, w, target)  # the target's own weights as the draft
    from waferllm.engine.speculative import SpeculativeBackend

    out = generate_one(SpeculativeBackend(target, draft, 3), byte_tokenizer(), list(range(1, 12)),
                       SamplingParams(max_tokens=17, temperature=0, ignore_eos=True))
    s = out.metrics["backend"]["speculative"]
    assert s["acceptance_rate"] == 1.0 and s["rounds"] == 4  # 16 tokens after the first, 4 per round
    assert s["rejected"] == 0 and s["accepted"] == 12


@pytest.mark.parametrize("acceptance,rounds", [(1.0, 5), (0.0, 19)])
def test_dry_rounds_follow_the_acceptance(acceptance, rounds):
    """20 tokens, k=3: accepting every draft, a round emits 4 (its own and 3 drafts): 19
    tokens after the first take 5 rounds; accepting none, one per round."""
    cfg = get_model_preset("llama3-8b")
    target = WaferModel(cfg, None, WSE2, _EIGHT_B.replace(max_seq_len=148, prompt_len=128, speculative_tokens=3),
                        mode="dry")
    backend = speculative_backend(target, SpeculativeConfig(num_speculative_tokens=3, draft_model="llama3.2-1b"),
                                  draft_config=get_model_preset("llama3.2-1b"))
    backend.run_dry(128, 20, acceptance)
    m = backend.request_metrics()
    assert m["speculative"]["rounds"] == rounds
    assert backend.emitted == 20
    assert m["tpot_s"] == pytest.approx(WSE2.cycles_to_seconds(sum(backend.cycles.values())) / 19)
    assert m["prefill_tokens_per_s"] == pytest.approx(128 / m["ttft_s"])


# ---------------------------------------------------------------------------- placement


def test_free_rectangles_are_free_and_the_largest_comes_first():
    w = WSE2.replace(rows=40, cols=50)
    taken = [Region(w, 20, 20, 0, 0), Region(w, 20, 20, 0, 20), Region(w, 12, 12, 20, 0)]
    used = np.zeros((40, 50), int)
    for r in taken:
        used[r.row0:r.row0 + r.rows, r.col0:r.col0 + r.cols] = 1
    rects = free_rectangles(w, taken)
    for r0, c0, h, wd in rects:
        assert not used[r0:r0 + h, c0:c0 + wd].any()
        # maximal: no side can grow by one
        for g in ((r0 - 1, c0, h + 1, wd), (r0, c0 - 1, h, wd + 1), (r0, c0, h + 1, wd), (r0, c0, h, wd + 1)):
            if g[0] >= 0 and g[1] >= 0 and g[0] + g[2] <= 40 and g[1] + g[3] <= 50:
                assert used[g[0]:g[0] + g[2], g[1]:g[1] + g[3]].any()
    # the largest empty rectangle by brute force: every (top, bottom, left, right) at once
    s = np.zeros((41, 51), int)
    s[1:, 1:] = used.cumsum(0).cumsum(1)
    t, b = np.triu_indices(41, 1)
    l, r = np.triu_indices(51, 1)
    inside = s[b][:, r] - s[t][:, r] - s[b][:, l] + s[t][:, l]
    area = (b - t)[:, None] * (r - l)[None, :]
    assert rects[0][2] * rects[0][3] == area[inside == 0].max() == 20 * 38  # rows 20..40, cols 12..50


def test_the_draft_sits_on_pes_the_target_leaves_idle():
    cfg = get_model_preset("llama3-8b")
    target = WaferModel(cfg, None, WSE2, _EIGHT_B, mode="dry")
    draft = place_draft(get_model_preset("llama3.2-1b"), None, target, mode="dry")
    for d in draft.plan.decode.stages + draft.plan.prefill.stages:
        for t in target.plan.decode.stages + target.plan.prefill.stages:
            a, b = d.region, t.region
            assert a.row0 >= b.row0 + b.rows or b.row0 >= a.row0 + a.rows or a.col0 >= b.col0 + b.cols \
                or b.col0 >= a.col0 + a.cols
        assert d.region.row0 + d.region.rows <= WSE2.rows and d.region.col0 + d.region.cols <= WSE2.cols


def test_a_draft_grid_that_does_not_fit_is_refused_with_one_that_does():
    cfg = get_model_preset("llama3-8b")
    target = WaferModel(cfg, None, WSE2, _EIGHT_B, mode="dry")
    with pytest.raises(PlacementError) as err:
        place_draft(get_model_preset("llama3.2-1b"), None, target, grid=300, mode="dry")
    fit = err.value.context["fit_grid"]
    assert fit and f"{fit}x{fit} draft grid fits" in str(err.value)
    assert place_draft(get_model_preset("llama3.2-1b"), None, target, grid=fit, mode="dry").plan.decode.grid == fit


@pytest.mark.parametrize("fields,message", [
    (dict(num_speculative_tokens=0, draft_layers=2), "num_speculative_tokens"),
    (dict(num_speculative_tokens=4), "needs a draft"),
    (dict(draft_layers=2, draft_model="x"), "not both"),
    (dict(draft_layers=2, acceptance=1.5), "acceptance"),
    (dict(draft_layers=2, acceptance_method="typical"), "acceptance_method must be one of rejection, exact"),
])
def test_bad_speculative_configs_say_what_is_wrong(fields, message):
    with pytest.raises(RequestError, match=message):
        SpeculativeConfig(**fields)


def test_draft_layers_must_leave_the_draft_smaller(tiny):
    cfg, w = tiny
    with pytest.raises(RequestError, match="draft_layers must be from 1 to 2"):
        first_layers(cfg, w, 3)


def test_a_draft_with_another_vocabulary_is_refused():
    cfg = get_model_preset("llama3-8b")
    target = WaferModel(cfg, None, WSE2, _EIGHT_B, mode="dry")
    with pytest.raises(RequestError, match="share the target's tokenizer"):
        place_draft(get_model_preset("smollm2"), None, target, mode="dry")


def test_speculative_config_from_a_dict_names_unknown_fields():
    assert SpeculativeConfig.coerce({"draft_layers": 3, "num_speculative_tokens": 2}) == SpeculativeConfig(2, 3)
    assert SpeculativeConfig.coerce({"draft_layers": 3, "acceptance_method": "exact"}).acceptance_method == "exact"
    assert SpeculativeConfig(draft_layers=3).acceptance_method == "rejection"
    with pytest.raises(RequestError, match="unknown speculative_config field.*draft_lyers"):
        SpeculativeConfig.coerce({"draft_lyers": 3})
    with pytest.raises(RequestError, match="speculative_tokens must be a whole number"):
        RunConfig(speculative_tokens=-1)


def test_the_planner_budgets_the_verification_rows():
    """A verification pass of k+1 tokens runs them as rows of one micro-batch: decode plans
    for that many rows, as for a batch of that many requests on one region."""
    cfg = get_model_preset("llama3-8b")
    run = RunConfig.for_request(512, 64, prefill_grid=600, decode_grid=360, weights="int8")
    assert run.plan(cfg, WSE2).decode.rows == 1
    assert run.replace(speculative_tokens=4).plan(cfg, WSE2).decode.rows == 5


@pytest.mark.parametrize("k", [2, 6])
def test_verification_passes_fit_what_the_plan_accepts(k):
    """At the longest context the planner accepts for k drafts, a verification pass at the
    end of the context runs without overflowing SRAM (its k+1 tokens' vectors and score
    tiles are budgeted); the context one token longer is refused at planning."""
    cfg = tiny_config(num_layers=6, hidden_size=128, intermediate_size=256, num_heads=8, num_kv_heads=2,
                      head_dim=16, max_position_embeddings=100000)
    wafer = WSE2.replace(rows=16, cols=16, sram_bytes_per_pe=32 * 1024)

    def plans(n):
        try:
            RunConfig(prefill_grid=None, decode_grid=8, max_seq_len=n, speculative_tokens=k).plan(cfg, wafer,
                                                                                                  suggest=False)
            return True
        except PlacementError:
            return False

    lo, hi = 1, 1 << 16
    assert plans(lo) and not plans(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plans(mid) else (lo, mid)
    wm = WaferModel(cfg, None, wafer, RunConfig(prefill_grid=None, decode_grid=8, max_seq_len=lo,
                                                speculative_tokens=k), mode="dry")
    wm.start_decode(lo - k - 1)
    wm.verify(0, [None] * (k + 1))  # the cache is full after it
    assert wm.positions[0] == lo


def test_a_target_planned_for_fewer_drafts_is_refused(tiny):
    cfg, w = tiny
    target = WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=8, decode_grid=4, max_seq_len=64, speculative_tokens=1))
    with pytest.raises(RequestError, match="speculative_tokens=3"):
        speculative_backend(target, SpeculativeConfig(num_speculative_tokens=3, draft_layers=1))
    with pytest.raises(RequestError, match="planned for 2"):  # a pass wider than the plan's rows
        target.reset()
        target.prefill(PROMPT)
        target.verify(0, [1, 2, 3])


def test_concat_rollback_stays_on_the_bottom_row(tiny):
    cfg, w = tiny
    wm = _model(cfg, w, "mesh", "concat")
    wm.decode(3)
    with pytest.raises(Exception, match="bottom row holds"):
        wm.decode_stages[0].cache.rollback(int(wm.decode_stages[0].cache.count[-1]) + 1)


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                                    SamplingParams(max_tokens=20, temperature=0.8, seed=3, ignore_eos=True)])
def test_drafting_ahead_keeps_the_targets_tokens(tiny, params):
    """Drafting the next round during verification changes only when drafts are made: with
    exact match the tokens are the target's own, greedy and seeded alike."""
    cfg, w = tiny
    plain = generate_one(WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=8, decode_grid=4, max_seq_len=64)),
                         byte_tokenizer(), list(range(1, 12)), params)
    for layers, k in ((2, 2), (1, 3)):
        target = WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=8, decode_grid=4, max_seq_len=64,
                                                    speculative_tokens=k))
        backend = speculative_backend(target, SpeculativeConfig(num_speculative_tokens=k, draft_layers=layers,
                                                                 draft_ahead=True, acceptance_method="exact"))
        out = generate_one(backend, byte_tokenizer(), list(range(1, 12)), params)
        assert out.token_ids == plain.token_ids
        s = out.metrics["backend"]["speculative"]
        assert s["rounds"] + s["accepted"] == len(out.token_ids) - 1


def test_a_perfect_draft_drafting_ahead_has_every_round_ready(tiny):
    """With the target as its own draft every guess is right: after the first round each
    round's drafts were made during the previous verification."""
    cfg, w = tiny
    target = WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=8, decode_grid=4, max_seq_len=64, speculative_tokens=3))
    from waferllm.engine.speculative import SpeculativeBackend

    backend = SpeculativeBackend(target, place_draft(cfg, w, target), 3, ahead=True)
    out = generate_one(backend, byte_tokenizer(), list(range(1, 12)),
                       SamplingParams(max_tokens=17, temperature=0, ignore_eos=True))
    s = out.metrics["backend"]["speculative"]
    assert s["rounds"] == 4 and s["ahead_hits"] == 3 and s["draft_hidden_s"] > 0


def test_drafting_ahead_hides_draft_time_in_a_prediction():
    """Shape-only, llama3-8b with a 1B draft at 90% acceptance: the draft's exposed time
    falls by what ran during verification, so decode is faster."""
    cfg, draft = get_model_preset("llama3-8b"), get_model_preset("llama3.2-1b")
    out = {}
    for ahead in (False, True):
        target = WaferModel(cfg, None, WSE2, _EIGHT_B.replace(max_seq_len=576, speculative_tokens=2), mode="dry")
        b = speculative_backend(target, SpeculativeConfig(num_speculative_tokens=2, draft_model="llama3.2-1b",
                                                          draft_ahead=ahead), draft_config=draft)
        b.run_dry(512, 64, 0.9)
        out[ahead] = b.request_metrics()
    assert out[True]["speculative"]["ahead_hits"] > 0
    assert out[True]["speculative"]["decode_s"]["draft"] < out[False]["speculative"]["decode_s"]["draft"]
    assert out[True]["decode_tokens_per_s"] > out[False]["decode_tokens_per_s"]


# ---------------------------------------------------------------------------- rejection sampling

TOP2 = dict(temperature=1.0, top_k=2, ignore_eos=True)  # two tokens possible at each position
N_REQUESTS = 400


def _walk(model, prompt, sampler, depth: int, prefix=()) -> dict:
    """{prefix + the next ``depth`` tokens: probability} under ``model`` alone, by decoding
    every prefix anew (the processed distribution of ``sampler``'s request at each)."""
    model.reset()
    logits = np.asarray(model.prefill(prompt))[-1]
    for t in prefix:
        logits = model.decode(t)
    p = sampler.probs(logits)
    if depth == 1:
        return {prefix + (int(t),): float(p[t]) for t in np.nonzero(p)[0]}
    return {seq: float(p[t]) * q for t in np.nonzero(p)[0]
            for seq, q in _walk(model, prompt, sampler, depth - 1, prefix + (int(t),)).items()}


def _chi_square(counts: dict, probs: dict, n: int) -> tuple[float, float]:
    """Pearson's statistic of ``counts`` (n draws) against ``probs``, outcomes expected fewer
    than 5 times pooled; and the 99.9% quantile of its distribution (Wilson-Hilferty)."""
    expected = {k: v * n for k, v in probs.items()}
    rare = [k for k, e in expected.items() if e < 5]
    obs = [counts.get(k, 0) for k in expected if k not in rare] + [sum(counts.get(k, 0) for k in rare)]
    exp = [e for k, e in expected.items() if k not in rare] + [sum(expected[k] for k in rare)]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    df = sum(e > 0 for e in exp) - 1
    return stat, df * (1 - 2 / (9 * df) + 3.09 * np.sqrt(2 / (9 * df))) ** 3


def test_rejection_sampling_draws_the_targets_own_distribution(tiny):
    """The first 3 tokens of 400 seeded requests (k=2, a 2-layer draft) against the target's
    distribution for them, enumerated without a draft: token 1 comes from the prefill, token 2
    verifies the round's first draft, token 3 its second draft or a new round's. The draft
    disagrees with the target (after token 202 it would say 83 or 130, the target 83 or
    158): guesses are kept and redrawn, and the first draft is kept as often as
    sum(min(p, q)) says, p the target's distribution there and q the draft's."""
    cfg, w = tiny
    n, prompt = N_REQUESTS, list(range(1, 12))
    sampler = Sampler(SamplingParams(**TOP2))
    plain = WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=8, decode_grid=4, max_seq_len=64))
    target = _walk(plain, prompt, sampler, 3)
    dcfg, dw = first_layers(cfg, w, 2)
    alone = WaferModel(dcfg, dw, WSE2, RunConfig(prefill_grid=8, decode_grid=4, max_seq_len=64))
    keep_first = 0.0  # the chance the first draft is kept: over token 1, sum(min(p, q)) at token 2
    for (t1,), p1 in _walk(plain, prompt, sampler, 1).items():
        p2 = {s[1]: p for s, p in _walk(plain, prompt, sampler, 1, (t1,)).items()}
        q2 = {s[1]: q for s, q in _walk(alone, prompt, sampler, 1, (t1,)).items()}
        keep_first += p1 * sum(min(p, q2.get(t, 0.0)) for t, p in p2.items())

    backend = _backend(cfg, w, 2, 2)
    counts, kept_first, kept, redrawn = {}, 0, 0, 0
    for seed in np.random.default_rng(2023).integers(1 << 31, size=n):  # the requests' own seeds
        out = generate_one(backend, None, prompt, SamplingParams(max_tokens=3, seed=int(seed), **TOP2))
        counts[tuple(out.token_ids)] = counts.get(tuple(out.token_ids), 0) + 1
        s = out.metrics["backend"]["speculative"]
        kept_first += s["accepted"] > 0
        kept, redrawn = kept + s["accepted"], redrawn + s["rejected"]
    assert set(counts) <= set(target)  # never a token the target would not sample
    stat, limit = _chi_square(counts, target, n)
    assert stat < limit, (stat, limit)
    assert kept > 20 and redrawn > 20
    assert abs(kept_first - n * keep_first) < 4 * np.sqrt(n * keep_first * (1 - keep_first))


@pytest.mark.parametrize("ahead", [False, True])
def test_rejection_sampling_repeats_with_a_seed_and_keeps_the_targets_support(tiny, ahead):
    """The same seed gives the same tokens (a new backend or the same one again); every token
    is one the target's top-k 2 allows (its logprobs, from the target's own logits, list the 2
    most likely tokens and the one taken: never a third); drafting ahead changes none of it."""
    cfg, w = tiny
    params = SamplingParams(max_tokens=20, seed=11, logprobs=2, **TOP2)
    backend = _backend(cfg, w, 2, 3, ahead=ahead)
    runs = [generate_one(b, byte_tokenizer(), list(range(1, 12)), params)
            for b in (backend, backend, _backend(cfg, w, 2, 3, ahead=ahead))]
    assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids and len(runs[0].token_ids) == 20
    assert runs[0].logprobs == runs[2].logprobs
    for tok, lp in zip(runs[0].token_ids, runs[0].logprobs):
        assert len(lp) == 2 and tok in lp
    s = runs[0].metrics["backend"]["speculative"]
    assert s["acceptance_method"] == "rejection" and s["sampled_drafts"]
    assert s["rounds"] + s["accepted"] == 19
    other = generate_one(backend, None, list(range(1, 12)), SamplingParams(max_tokens=20, seed=12, **TOP2))
    assert other.token_ids != runs[0].token_ids


def test_a_perfect_draft_keeps_every_sampled_guess(tiny):
    """The target as its own draft: q is p (to the verification pass's rounding), so rejection
    sampling keeps every guess at temperature 0.8 too; exact match keeps a guess only when
    the target's sample happens to be the draft's argmax."""
    cfg, w = tiny
    from waferllm.engine.speculative import SpeculativeBackend

    target = WaferModel(cfg, w, WSE2, RunConfig(prefill_grid=8, decode_grid=4, max_seq_len=64, speculative_tokens=3))
    draft = place_draft(cfg, w, target)
    params = SamplingParams(max_tokens=17, temperature=0.8, seed=5, ignore_eos=True)
    rates = {}
    for method in ("rejection", "exact"):
        out = generate_one(SpeculativeBackend(target, draft, 3, acceptance_method=method), byte_tokenizer(),
                           list(range(1, 12)), params)
        s = out.metrics["backend"]["speculative"]
        rates[method] = s["acceptance_rate"]
        if method == "rejection":
            assert s["rounds"] == 4 and s["accepted"] == 12 and s["rejected"] == 0
    assert rates["rejection"] == 1.0 > rates["exact"]


def test_rejection_sampling_streams_and_stops(tiny):
    """Streaming, max_tokens and stop strings as without a draft: the deltas make the text, the
    request ends at max_tokens, and a stop string taken from a run's text ends the same seeded
    run there (the tokens before it are the same draws)."""
    cfg, w = tiny
    backend = _backend(cfg, w, 2, 3)
    deltas = []
    params = dict(temperature=0.9, top_k=8, seed=21, ignore_eos=True)
    full = generate_one(backend, byte_tokenizer(), list(range(1, 12)), SamplingParams(max_tokens=24, **params),
                        on_token=lambda t, d: deltas.append((t, d)))
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    assert [t for t, _ in deltas] == full.token_ids and "".join(d for _, d in deltas) == full.text
    text = full.text.replace("\ufffd", "")
    stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1) if text[i:i + 2].isprintable())
    cut = generate_one(backend, byte_tokenizer(), list(range(1, 12)), SamplingParams(max_tokens=24, stop=stop, **params))
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:full.text.index(stop)] and cut.token_ids == full.token_ids[:len(cut.token_ids)]
