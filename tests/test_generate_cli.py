"""`waferllm generate` through the CLI entry point."""

import json

from waferllm.interfaces.cli import main


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
