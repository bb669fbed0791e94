"""`waferllm generate` through the CLI entry point."""

import json

import pytest

from waferllm.interfaces.cli import main
from waferllm.models.testing import random_weights, tiny_config, write_hf_checkpoint


def test_generate_reference_json(capsys):
    rc = main(["generate", "--engine", "reference", "--prompt", "The capital of France is", "--max-tokens", "4",
               "--json", "--logprobs", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    d = json.loads(out)
    assert len(d["token_ids"]) == 4 and d["finish_reason"] == "length"
    assert d["prompt_token_ids"] and isinstance(d["text"], str) and "Paris" in d["text"]
    assert len(d["logprobs"]) == 4 and all(str(t) in lp for t, lp in zip(d["token_ids"], d["logprobs"]))
    assert d["metrics"]["generated_tokens"] == 4


def test_generate_default_engine_streams(capsys):
    rc = main(["generate", "--prompt", "What is the capital of France?", "--chat", "--max-tokens", "12"])
    cap = capsys.readouterr()
    assert rc == 0
    assert "Paris" in cap.out


def test_generate_bad_request(capsys):
    rc = main(["generate", "--engine", "reference", "--prompt", "hi", "--top-p", "0"])
    assert rc == 2
    assert "top_p" in capsys.readouterr().err


def test_generate_numerics_mesh_and_fused_agree(capsys):
    """--numerics mesh executes every layer on the mesh; the default replays known programs and
    computes fused values: the same tokens and the same predicted figures."""
    outs = {}
    for numerics in ("mesh", "fused"):
        rc = main(["generate", "--prompt", "The wafer-scale engine is", "--max-tokens", "4", "--json",
                   "--prefill-grid", "16", "--decode-grid", "16", "--numerics", numerics])
        assert rc == 0
        outs[numerics] = json.loads(capsys.readouterr().out)
    assert outs["mesh"]["token_ids"] == outs["fused"]["token_ids"]
    for key in ("ttft_s", "tpot_s", "energy_j", "bytes_moved", "sram_peak_bytes_per_pe", "sram_breakdown_bytes_per_pe",
                "kv_capacity_tokens"):
        a, b = outs["mesh"]["metrics"][key], outs["fused"]["metrics"][key]
        assert a == b if isinstance(a, dict) else abs(a - b) <= 1e-9 * abs(a), key


def test_generate_numerics_is_checked(capsys):
    rc = main(["generate", "--prompt", "hi", "--numerics", "dense"])
    assert rc == 2
    assert "--numerics must be one of fused, mesh, got 'dense'" in capsys.readouterr().err


def test_generate_with_a_draft_gives_the_same_tokens(capsys):
    """--draft-layers: SmolLM2's first 25 layers draft, the whole model verifies; greedy tokens
    are the model's own, and the JSON says what speculation did."""
    outs = {}
    for extra in ([], ["--draft-layers", "25", "--speculative-tokens", "2"]):
        rc = main(["generate", "--prompt", "The capital of France is Paris. The capital of Italy is", "--max-tokens",
                   "6", "--json", "--prefill-grid", "24", "--decode-grid", "24", "--ignore-eos", *extra])
        assert rc == 0
        outs[bool(extra)] = json.loads(capsys.readouterr().out)
    assert outs[True]["token_ids"] == outs[False]["token_ids"]
    s = outs[True]["metrics"]["speculative"]
    assert s["draft_layers"] == 25 and s["num_speculative_tokens"] == 2
    assert s["acceptance_method"] == "rejection" and not s["sampled_drafts"]  # greedy: rejection is exact match
    assert s["rounds"] + s["accepted"] == 5  # every token after the first: a round's own or an accepted draft


def test_generate_draft_options_are_checked(capsys):
    rc = main(["generate", "--prompt", "hi", "--draft-layers", "30"])
    assert rc == 2
    assert "draft_layers must be from 1 to 29" in capsys.readouterr().err
    rc = main(["generate", "--engine", "reference", "--prompt", "hi", "--draft-layers", "3"])
    assert rc == 2
    assert "only apply to the wafer engine" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 3-layer random model with a byte tokenizer (an HF folder): fast to place and run."""
    cfg = tiny_config(num_layers=3)
    return write_hf_checkpoint(str(tmp_path_factory.mktemp("tiny") / "tiny-hf"), random_weights(cfg, scale=0.3))


def test_generate_acceptance_methods(capsys, tiny_model):
    """--acceptance-method exact: a seeded sampled run gives the tokens of the run without a
    draft; rejection (the default) samples the draft's guesses, and the seed repeats its run."""
    base = ["generate", "--model", tiny_model, "--prompt", "hello wafer", "--max-tokens", "12", "--json",
            "--prefill-grid", "8", "--decode-grid", "4", "--ignore-eos", "--temperature", "0.8", "--seed", "3"]

    def run(*extra):
        assert main(base + list(extra)) == 0
        return json.loads(capsys.readouterr().out)

    draft = ["--draft-layers", "2", "--speculative-tokens", "3"]
    alone, exact = run(), run(*draft, "--acceptance-method", "exact")
    assert exact["token_ids"] == alone["token_ids"]
    assert exact["metrics"]["speculative"]["acceptance_method"] == "exact"
    sampled = [run(*draft), run(*draft, "--acceptance-method", "rejection")]
    assert sampled[0]["token_ids"] == sampled[1]["token_ids"] and len(sampled[0]["token_ids"]) == 12
    s = sampled[0]["metrics"]["speculative"]
    assert s["acceptance_method"] == "rejection" and s["sampled_drafts"]


def test_generate_acceptance_method_is_checked(capsys):
    rc = main(["generate", "--prompt", "hi", "--draft-layers", "3", "--acceptance-method", "typical"])
    assert rc == 2
    assert "--acceptance-method must be one of rejection, exact, got 'typical'" in capsys.readouterr().err
    rc = main(["generate", "--prompt", "hi", "--acceptance-method", "exact"])
    assert rc == 2
    assert "--acceptance-method only applies with a draft" in capsys.readouterr().err
