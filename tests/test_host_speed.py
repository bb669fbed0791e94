"""The simulator's host-side speed work changes no figure it computes.

``data/host_speed_reference.json`` holds figures computed before that work (caches of move
costs, SRAM analyses and reduction schedules; moves priced per element byte; a band priced
in the request's own execution): two tiny models run numerically (every logit's digest,
the ledger's cycles, counters and per-primitive cycles, each request's metrics) and a dry
prediction of SmolLM2 with its band. A change that moves a cost on purpose regenerates it
with ``.venv/bin/python tests/test_host_speed.py --write`` (and says why).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from waferllm.engine import predict as predict_mod
from waferllm.engine.run_config import RunConfig
from waferllm.engine.wafer import WaferModel
from waferllm.hardware import get_wafer
from waferllm.models.presets import get_model_preset
from waferllm.models.testing import random_weights, tiny_config

REFERENCE = Path(__file__).parent / "data" / "host_speed_reference.json"
WSE2 = get_wafer("wse2")
NUMERIC = {"num:llama:8:6": ({}, 8, 6), "num:qwen2:6:8": ({"num_kv_heads": 4, "qkv_bias": True, "arch": "qwen2"}, 6, 8)}
DRY = {"dry:smollm2-135m:512:512:120:120": ("smollm2-135m", 512, 512, 120, 120)}


#: the figures compared: what the run cost and held (a report may gain other keys)
FIGURES = ("ttft_s", "tpot_s", "transition_s", "restore_s", "prefill_tokens_per_s", "decode_tokens_per_s",
           "e2e_tokens_per_s", "energy_j", "energy_breakdown_j", "flops", "bytes_moved", "routing_stages",
           "kv_capacity_tokens", "kv_capacity_tokens_concat", "sram_breakdown_bytes_per_pe", "sram_peak_bytes_per_pe",
           "routes_peak_per_pe", "kv_shift_moves", "breakdown_s", "band") + tuple(
    f"{k}_{end}" for k in ("ttft_s", "tpot_s", "transition_s", "prefill_tokens_per_s", "decode_tokens_per_s",
                           "e2e_tokens_per_s") for end in ("low", "high"))


def _plain(m: dict) -> dict:
    return json.loads(json.dumps({k: m[k] for k in FIGURES if k in m}, default=float))


def numeric_figures(overrides: dict, pg: int, dg: int) -> dict:
    """Two requests (the second restores the weights) of 11 and 12 prompt tokens and 4 greedy
    steps each on a tiny random model: logits digests, tokens, metrics and the ledger. Every
    layer runs primitive by primitive (``numerics="mesh"``), as when the figures were taken;
    tests/test_fused_numerics.py compares the fused numerics with it."""
    cfg = tiny_config(**overrides)
    wm = WaferModel(cfg, random_weights(cfg, seed=3), WSE2, RunConfig(prefill_grid=pg, decode_grid=dg,
                                                                      max_seq_len=64, dtype="fp16", numerics="mesh"))
    rec: dict = {"logits": [], "tokens": []}
    # the logits themselves, not a digest: BLAS kernels (chosen per CPU) may round differently
    values = lambda x: np.round(np.asarray(x, np.float64).ravel(), 6).tolist()  # noqa: E731
    for req in range(2):
        wm.reset()
        logits = wm.prefill((np.arange(11 + req) * 7 + 3) % cfg.vocab_size)
        rec["logits"].append(values(logits))
        tok = int(np.argmax(logits[-1]))
        for _ in range(4):
            logits = wm.decode(tok)
            rec["logits"].append(values(logits))
            tok = int(np.argmax(logits))
            rec["tokens"].append(tok)
        rec[f"metrics{req}"] = _plain(wm.request_metrics())
    led = wm.ledger
    rec["ledger"] = {"cycles": led.cycles, "compute": led.compute_cycles, "comm": led.comm_cycles,
                     "exposed": led.exposed_comm_cycles, "overhead": led.overhead_cycles, "totals": dict(led.totals),
                     "by_primitive": dict(led.by_primitive)}
    return json.loads(json.dumps(rec, default=float))


def dry_figures(name: str, li: int, lo: int, pg: int, dg: int) -> dict:
    return _plain(predict_mod.predict(get_model_preset(name), WSE2, li, lo, pg, dg, band=True, gpus=False))


def _all() -> dict:
    out = {k: numeric_figures(*v) for k, v in NUMERIC.items()}
    out.update({k: dry_figures(*v) for k, v in DRY.items()})
    return out


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


def _expected(ref: dict) -> dict:
    """The reference's figures of :data:`FIGURES` (the file keeps whole reports)."""
    out = dict(ref)
    for k in ("metrics0", "metrics1"):
        if k in out:
            out[k] = _plain(out[k])
    return out if "ledger" in out else _plain(out)


@pytest.mark.parametrize("key", sorted(NUMERIC))
def test_numeric_run_equals_reference(reference, key):
    """Tokens, every ledger figure and both requests' metrics exactly; the logits to the
    rounding a different BLAS kernel may bring (fp16 activations amplify it to ~1e-3)."""
    got, want = numeric_figures(*NUMERIC[key]), _expected(reference[key])
    for g, w in zip(got.pop("logits"), want.pop("logits"), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-3 * max(1.0, float(np.max(np.abs(w)))))
    assert got == want


def _assert_close(got, want, path="") -> None:
    """Equal, floats to 1e-12 relative (nested dicts and lists alike)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for k in want:
            _assert_close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-300), path
    else:
        assert got == want, path


@pytest.mark.parametrize("key", sorted(DRY))
def test_dry_prediction_with_band_equals_reference(reference, key):
    got = dry_figures(*DRY[key])
    # dry runs replay identical steps (the same costs, summed in another order): equal to rounding
    _assert_close(got, _expected(reference[key]))
    assert got["ttft_s_low"] < got["ttft_s"] < got["ttft_s_high"]


if __name__ == "__main__" and "--write" in sys.argv:
    REFERENCE.write_text(json.dumps(_all(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE}")
