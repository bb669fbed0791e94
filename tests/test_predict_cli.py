"""`waferllm predict` from the command line: its JSON is the Python `predict()` on the same inputs,
`--set` changes the wafer and nothing else, extrapolation and does-not-fit say so."""

import json

import pytest

from waferllm.engine.predict import predict
from waferllm.errors import PlacementError
from waferllm.hardware import get_wafer
from waferllm.interfaces.cli import main
from waferllm.models.presets import get_model_preset

SMALL = ["--model", "smollm2-135m", "--input-len", "64", "--output-len", "8", "--prefill-grid", "64",
         "--decode-grid", "48"]
HOST = ("host_wall_s",)  # host timings differ between any two runs
# what the run does and holds, which a wafer timing constant cannot change
WORK = ("flops", "bytes_moved", "routing_stages", "routes_peak_per_pe", "kv_capacity_tokens",
        "kv_capacity_tokens_concat", "kv_shift_moves", "sram_peak_bytes_per_pe", "placement", "gpu_baselines")


def _cli_json(capsys, argv) -> dict:
    assert main(["predict", *argv, "--json"]) == 0
    return {k: v for k, v in json.loads(capsys.readouterr().out).items() if k not in HOST}


def _python(model, wafer, *args, **kw) -> dict:
    """``predict()`` as the CLI's JSON would carry it."""
    m = predict(get_model_preset(model), wafer, *args, **kw)
    return {k: v for k, v in json.loads(json.dumps(m, default=float)).items() if k not in HOST}


def test_predict_json_is_the_python_prediction(capsys):
    cli = _cli_json(capsys, SMALL)
    py = _python("smollm2-135m", get_wafer("wse2"), 64, 8, 64, 48)
    assert cli == py
    assert (cli["prefill_grid"], cli["decode_grid"]) == (64, 48)
    assert cli["prefill_tokens_per_s"] == pytest.approx(64 / cli["ttft_s"])
    assert cli["decode_tokens_per_s"] == pytest.approx(1 / cli["tpot_s"])


def test_set_beta_changes_the_timing_and_nothing_else(capsys):
    base = _cli_json(capsys, SMALL)
    slow = _cli_json(capsys, SMALL + ["--set", "beta_cycles=50"])
    assert slow == _python("smollm2-135m", get_wafer("wse2", beta_cycles=50), 64, 8, 64, 48)
    assert slow["constants"]["beta_cycles"] == {"value": 50.0, "status": "user"}
    assert base["constants"]["beta_cycles"]["value"] < 50
    assert {k: v for k, v in slow["constants"].items() if k != "beta_cycles"} == \
        {k: v for k, v in base["constants"].items() if k != "beta_cycles"}
    for key in WORK:
        assert slow[key] == base[key], key
    assert slow["ttft_s"] > base["ttft_s"] and slow["tpot_s"] > base["tpot_s"]


def test_predict_extrapolation_is_the_python_one_and_says_so(capsys):
    argv = ["--model", "llama3-8b", "--input-len", "256", "--output-len", "4", "--prefill-grid", "360",
            "--decode-grid", "360", "--extrapolate-from-layers", "1"]
    cli = _cli_json(capsys, argv)
    assert cli == _python("llama3-8b", get_wafer("wse2"), 256, 4, 360, 360, layers=1)
    assert cli["extrapolated_from_layers"] == 1
    assert "1 of 32 layers" in cli["note"] and "scaled by 32" in cli["note"]


def test_predict_model_that_does_not_fit_is_a_clean_error(capsys):
    with pytest.raises(PlacementError, match="does not fit") as exc:
        predict(get_model_preset("llama3-70b"), get_wafer("wse2"), 256, 4, 360, 360)
    rc = main(["predict", "--model", "llama3-70b", "--input-len", "256", "--output-len", "4",
               "--prefill-grid", "360", "--decode-grid", "360"])
    assert rc == 2
    err = " ".join(capsys.readouterr().err.split())
    assert " ".join(str(exc.value).split()) in err and "Traceback" not in err


def test_predict_text_report_shows_the_predicted_figures(capsys):
    py = _python("smollm2-135m", get_wafer("wse2"), 64, 8, 64, 48)
    assert main(["predict", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "GPU baselines" in out and "roofline" in out and "calibrated" in out and "placement plan" in out
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines()
            if line.count("│") >= 3}
    assert 1e-3 <= py["ttft_s"] < 1 and 1e-6 <= py["tpot_s"] < 1e-3  # shown in ms and us
    # each figure with its band
    assert rows["TTFT (prefill)"] == (f"{py['ttft_s'] * 1e3:.3g} ms  ({py['ttft_s_low'] * 1e3:.3g} ms - "
                                      f"{py['ttft_s_high'] * 1e3:.3g} ms)")
    assert rows["TPOT"] == f"{py['tpot_s'] * 1e6:.3g} us  ({py['tpot_s_low'] * 1e6:.3g} us - {py['tpot_s_high'] * 1e6:.3g} us)"
    assert py["ttft_s_low"] < py["ttft_s"] < py["ttft_s_high"]


def test_predict_with_a_draft_sets_the_target_alone_beside_it(capsys):
    argv = ["predict", "--model", "llama3-8b", "--input-len", "128", "--output-len", "16", "--prefill-grid", "360",
            "--decode-grid", "360", "--weights", "int8", "--draft-model", "llama3.2-1b", "--acceptance", "1.0",
            "--speculative-tokens", "3", "--json"]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    s = d["speculative"]["speculative"]
    # every draft accepted: a round emits its own token and 3 drafts, so 15 tokens take 4 rounds
    assert s["rounds"] == 4 and s["assumed_acceptance"] == 1.0
    from waferllm.engine.predict import predict_run
    from waferllm.engine.run_config import RunConfig

    alone = predict_run(get_model_preset("llama3-8b"), "wse2", RunConfig.for_request(
        128, 16, prefill_grid=360, decode_grid=360, weights="int8"), 128, 16, gpus=False, band=False)
    assert d["target_alone"]["tpot_s"] == pytest.approx(alone["tpot_s"])
    assert d["speculative"]["ttft_s"] == pytest.approx(alone["ttft_s"])  # the draft prefills beside the target


def test_predict_with_a_draft_needs_an_acceptance(capsys):
    assert main(["predict", "--model", "llama3-8b", "--draft-model", "llama3.2-1b"]) == 2
    assert "give --acceptance" in capsys.readouterr().err


def test_predict_draft_options_without_a_draft_are_refused(capsys):
    assert main(["predict", "--model", "llama3-8b", "--acceptance", "0.8"]) == 2
    assert "--acceptance only applies with a draft" in capsys.readouterr().err


def test_predict_draft_ahead_is_reported(capsys):
    argv = ["predict", "--model", "llama3-8b", "--input-len", "128", "--output-len", "8", "--prefill-grid", "360",
            "--decode-grid", "360", "--weights", "int8", "--draft-model", "llama3.2-1b", "--acceptance", "1.0",
            "--speculative-tokens", "2", "--draft-ahead", "--json"]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)["speculative"]["speculative"]
    # every draft and every guess taken: 7 tokens after the first in rounds of 3, the later ones drafted ahead
    assert s["draft_ahead"] and s["rounds"] == 3 and s["ahead_hits"] == 2
