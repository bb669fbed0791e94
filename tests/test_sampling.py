"""SamplingParams validation, the sampler, and the shared generation loop (on a fake backend)."""

import numpy as np
import pytest

from waferllm.engine.generate import generate_one
from waferllm.engine.sampling import Sampler, SamplingParams, accept_or_resample, apply_top_k_top_p, log_softmax
from waferllm.errors import RequestError


@pytest.mark.parametrize("kw", [
    dict(max_tokens=0), dict(max_tokens=1.5), dict(temperature=-0.1), dict(temperature=float("nan")),
    dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5), dict(seed="x"), dict(stop=[""]), dict(stop_token_ids=[-1]),
    dict(logprobs=-1), dict(prompt_logprobs=1.5),
])
def test_params_validation(kw):
    name = next(iter(kw))
    with pytest.raises(RequestError, match=rf"^{name} "):  # the message names the bad field first
        SamplingParams(**kw)


def test_params_defaults_and_normalisation():
    p = SamplingParams(stop="###", top_k=0)
    assert p.stop == ["###"] and p.stop_token_ids == [] and not p.greedy
    assert SamplingParams(temperature=0).greedy


LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))


def test_greedy_and_seeded_determinism():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000)
    assert Sampler(SamplingParams(temperature=0)).sample(logits) == int(np.argmax(logits))
    a = [Sampler(SamplingParams(seed=7)).sample(logits) for _ in range(3)]
    assert len(set(a)) == 1
    s1, s2 = Sampler(SamplingParams(seed=11)), Sampler(SamplingParams(seed=11))
    assert [s1.sample(logits) for _ in range(20)] == [s2.sample(logits) for _ in range(20)]


def test_sampling_distribution():
    s = Sampler(SamplingParams(seed=0))
    counts = np.bincount([s.sample(LOGITS) for _ in range(20000)], minlength=5) / 20000
    np.testing.assert_allclose(counts, np.exp(LOGITS), atol=0.015)


def test_top_k_top_p():
    x = apply_top_k_top_p(LOGITS, 2, 1.0)
    assert np.isfinite(x[:2]).all() and np.isinf(x[2:]).all()
    # top_p=0.7: 0.5 alone is below 0.7, 0.5+0.2 reaches it -> keep two
    x = apply_top_k_top_p(LOGITS, -1, 0.7)
    assert np.isfinite(x[:2]).all() and np.isinf(x[2:]).all()
    x = apply_top_k_top_p(LOGITS, -1, 0.71)
    assert np.isfinite(x[:3]).all() and np.isinf(x[3:]).all()
    x = apply_top_k_top_p(LOGITS, -1, 0.01)  # the top token always stays
    assert np.isfinite(x[0]) and np.isinf(x[1:]).all()
    s = Sampler(SamplingParams(seed=1, top_k=3, top_p=0.9, temperature=0.7))
    seen = {s.sample(LOGITS) for _ in range(2000)}
    assert seen == {0, 1, 2}
    p = Sampler(SamplingParams(top_p=0.8)).probs(LOGITS)
    np.testing.assert_allclose(p[:3], np.array([0.5, 0.2, 0.15]) / 0.85)


def test_logprobs_dict():
    s = Sampler(SamplingParams(logprobs=2))
    d = s.logprobs(LOGITS, 4, 2)
    assert list(d) == [4, 0, 1]
    np.testing.assert_allclose(d[0], np.log(0.5))
    np.testing.assert_allclose(log_softmax(LOGITS), LOGITS, atol=1e-12)


class FakeBackend:
    """Logits from a fixed table: next token is (last + 1) % V, strongly preferred."""

    V = 10

    def __init__(self):
        self.calls = []

    def reset(self):
        self.calls.append("reset")

    def _row(self, t):
        r = np.zeros(self.V, np.float32)
        r[(t + 1) % self.V] = 10.0
        return r

    def prefill(self, ids, prompt_logits=False):
        self.calls.append(("prefill", list(ids), prompt_logits))
        rows = np.stack([self._row(t) for t in ids])
        return rows if prompt_logits else rows[-1:]

    def decode(self, t):
        self.calls.append(("decode", t))
        return self._row(t)


class FakeTok:
    eos_token_ids = [9]

    def decode(self, ids, skip_special_tokens=True):
        return "".join("ABCDEFGHI"[i] if i < 9 else ("" if skip_special_tokens else "</s>") for i in ids)


def test_generate_loop_length_eos_stop_ids():
    b = FakeBackend()
    out = generate_one(b, FakeTok(), [0], SamplingParams(max_tokens=3, temperature=0))
    assert out.token_ids == [1, 2, 3] and out.text == "BCD" and out.finish_reason == "length"
    # no wasted step after the last token; the prompt's logits only when asked for
    assert b.calls == ["reset", ("prefill", [0], False), ("decode", 1), ("decode", 2)]
    out = generate_one(FakeBackend(), FakeTok(), [5], SamplingParams(max_tokens=10, temperature=0))
    assert out.token_ids == [6, 7, 8, 9] and out.text == "GHI" and out.finish_reason == "stop"
    out = generate_one(FakeBackend(), FakeTok(), [5], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert out.token_ids == [6, 7, 8, 9, 0, 1] and out.finish_reason == "length"
    out = generate_one(FakeBackend(), FakeTok(), [0], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[4]))
    assert out.token_ids == [1, 2, 3, 4] and out.text == "BCD" and out.stop_reason == 4


def test_generate_stop_strings_and_streaming():
    deltas = []
    out = generate_one(FakeBackend(), FakeTok(), [0], SamplingParams(max_tokens=10, temperature=0, stop=["DEF", "XYZ"]),
                       on_token=lambda t, d: deltas.append((t, d)))
    assert out.text == "BC" and out.finish_reason == "stop" and out.stop_reason == "DEF"
    assert out.token_ids == [1, 2, 3, 4, 5]
    assert "".join(d for _, d in deltas) == "BC" and [t for t, _ in deltas] == out.token_ids
    out = generate_one(FakeBackend(), FakeTok(), [0], SamplingParams(max_tokens=10, temperature=0, stop="DE",
                                                                     include_stop_str_in_output=True))
    assert out.text == "BCDE"
    deltas = []
    generate_one(FakeBackend(), FakeTok(), [0], SamplingParams(max_tokens=4, temperature=0), on_token=lambda t, d: deltas.append(d))
    assert deltas == ["B", "C", "D", "E"]


def test_generate_logprobs_and_prompt_logprobs():
    b = FakeBackend()
    out = generate_one(b, FakeTok(), [0, 1, 5], SamplingParams(max_tokens=2, temperature=0, logprobs=1, prompt_logprobs=0))
    assert b.calls[1] == ("prefill", [0, 1, 5], True)
    assert len(out.logprobs) == 2 and set(out.logprobs[0]) == {6}
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 3
    assert out.prompt_logprobs[1][1] > -1e-3 and out.prompt_logprobs[2][5] < -9
    d = out.to_dict()
    assert d["logprobs"][0] == {"6": pytest.approx(out.logprobs[0][6])}
    with pytest.raises(RequestError, match="the prompt is empty"):
        generate_one(FakeBackend(), FakeTok(), [], SamplingParams())


def test_real_model_seeded_sampling(smollm_reference):
    p = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    a = smollm_reference.generate("Tell me a story", p)[0]
    b = smollm_reference.generate("Tell me a story", p)[0]
    assert a.token_ids == b.token_ids and a.text == b.text and len(a.token_ids) >= 1
    c = smollm_reference.generate("Hello", SamplingParams(max_tokens=12, temperature=0, stop=["."]))[0]
    assert "." not in c.text


# ---------------------------------------------------------------------------- speculative (rejection) sampling

P = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
Q = np.array([0.05, 0.1, 0.15, 0.3, 0.4])  # a draft that favours the target's unlikely tokens


def test_accept_or_resample_draws_the_targets_distribution():
    """Guesses drawn from q, kept or redrawn: the tokens follow p (chi-square over 40,000
    draws, against the 99.9% quantile for 4 degrees of freedom, 18.47), and a guess is kept
    with probability sum(min(p, q)) = 0.45 (a redrawn token is never the guess: p < q there)."""
    rng = np.random.default_rng(0)
    n = 40000
    guesses = rng.choice(5, size=n, p=Q)
    out = np.array([accept_or_resample(P, Q, int(g), rng) for g in guesses])
    counts = np.bincount(out, minlength=5)
    assert ((counts - n * P) ** 2 / (n * P)).sum() < 18.47
    kept = (out == guesses).mean()
    assert abs(kept - 0.45) < 4 * np.sqrt(0.45 * 0.55 / n)


def test_accept_or_resample_edge_cases():
    rng = np.random.default_rng(1)
    # the draft's distribution is the target's: every guess is kept
    assert all(accept_or_resample(P, P, g, rng) == g for g in range(5) for _ in range(50))
    # a guess the target never samples is never kept; the token comes from where p exceeds q
    p, q = np.array([0.0, 0.6, 0.4]), np.array([1.0, 0.0, 0.0])
    out = [accept_or_resample(p, q, 0, rng) for _ in range(4000)]
    assert 0 not in out and abs(out.count(1) / 4000 - 0.6) < 0.04
    # one-hot p and q (greedy): kept exactly when the guess is the target's argmax
    one = np.eye(3)
    assert accept_or_resample(one[2], one[2], 2, rng) == 2 and accept_or_resample(one[1], one[2], 2, rng) == 1


def test_sampler_verifies_a_proposed_guess():
    """A proposal applies to the next sample only; greedy requests take the argmax whatever the
    guess; the draft's guess comes from its processed distribution (top-k 2: two tokens)."""
    s = Sampler(SamplingParams(seed=3, top_k=2))
    guess, q = s.draft(LOGITS[::-1])  # the draft prefers tokens 4 and 3
    assert guess in (3, 4) and np.count_nonzero(q) == 2 and q[guess] > 0
    s.propose(4, np.eye(5)[4])  # a sure guess of a token top-k 2 removes: always redrawn
    assert s.sample(LOGITS) in (0, 1) and s.guess is None
    kept = 0  # the target's likeliest, proposed as a sure guess: kept with p(0) = 0.5/0.7
    for _ in range(2000):
        s.propose(0, np.eye(5)[0])
        kept += s.sample(LOGITS) == 0
    assert abs(kept / 2000 - 0.5 / 0.7) < 0.04
    g = Sampler(SamplingParams(temperature=0))
    assert g.draft(LOGITS[::-1]) == (4, None)
    g.propose(3, np.eye(5)[3])
    assert g.sample(LOGITS) == 0


def test_host_metrics_count_this_process_cpu_apart_from_wall_time():
    """A request's host figures give each phase's CPU seconds beside its wall time: a backend
    that waits (here: sleeps, as on a host shared with other work) spends wall time, not CPU."""
    import time

    class Waiting(FakeBackend):
        def decode(self, t):
            time.sleep(0.05)
            return super().decode(t)

    h = generate_one(Waiting(), FakeTok(), [0], SamplingParams(max_tokens=4, temperature=0)).metrics
    assert h["decode_time_s"] >= 3 * 0.05
    assert 0 <= h["decode_cpu_s"] < h["decode_time_s"] / 2
    assert 0 <= h["prefill_cpu_s"]
