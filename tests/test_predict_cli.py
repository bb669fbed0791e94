"""`waferllm predict` from the command line: JSON keys, extrapolation note, clean errors."""

import json

from waferllm.interfaces.cli import main

KEYS = ("ttft_s", "tpot_s", "prefill_tokens_per_s", "decode_tokens_per_s", "e2e_tokens_per_s", "energy_j",
        "kv_capacity_tokens", "kv_capacity_tokens_concat")


def test_predict_json_has_the_documented_keys(capsys):
    rc = main(["predict", "--model", "smollm2-135m", "--input-len", "64", "--output-len", "8",
               "--prefill-grid", "64", "--decode-grid", "48", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    for k in KEYS:
        assert k in d and d[k] > 0, k
    assert d["prefill_grid"] == 64 and d["decode_grid"] == 48
    assert d["placement"]["decode"]["grid"] == 48
    assert {g["device"] for g in d["gpu_baselines"]} >= {"A100-80GB", "H100-SXM"}
    assert d["constants"]["beta_cycles"]["status"] == "calibrated"


def test_predict_extrapolation_says_so(capsys):
    rc = main(["predict", "--model", "llama3-8b", "--input-len", "256", "--output-len", "4",
               "--prefill-grid", "360", "--decode-grid", "360", "--extrapolate-from-layers", "1", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["extrapolated_from_layers"] == 1 and "extrapolated" in d["note"]


def test_predict_model_that_does_not_fit_is_a_clean_error(capsys):
    rc = main(["predict", "--model", "llama3-70b", "--input-len", "256", "--output-len", "4",
               "--prefill-grid", "360", "--decode-grid", "360"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "Traceback" not in err


def test_predict_text_report(capsys):
    rc = main(["predict", "--model", "smollm2-135m", "--input-len", "32", "--output-len", "4",
               "--prefill-grid", "64", "--decode-grid", "48"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "TTFT" in out and "GPU roofline" in out and "placement plan" in out
