"""Every input gets a clear answer (issue 14): each case the issue lists, pinned.

CLI cases run `main()` in-process on a tiny random model (written by
waferllm.models.testing), so a wafer run takes a fraction of a second; a mistake must be
refused before anything slow happens, with one `error:` line, exit code 2 and no traceback.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from waferllm.engine.generate import as_prompt_list
from waferllm.engine.llm import LLM, _longest_fitting
from waferllm.engine.placement import phase_fits, plan
from waferllm.engine.predict import predict
from waferllm.engine.reference import ReferenceEngine
from waferllm.engine.sampling import SamplingParams
from waferllm.errors import (HardwareError, ModelError, PlacementError, RequestError, WaferLLMError,
                             with_context)
from waferllm.hardware import get_wafer
from waferllm.interfaces.cli import main
from waferllm.models.loader import load_model
from waferllm.models.presets import get_model_preset
from waferllm.models.testing import random_weights, tiny_config, write_gguf

WSE2 = get_wafer("wse2")
SMALL_SRAM = 12288  # tiny_config on wse2 with 12 KB per PE: 256 tokens need 64x64 prefill regions


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_gguf(str(tmp_path_factory.mktemp("tiny") / "tiny.gguf"), random_weights(tiny_config()))


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return load_model(tiny_gguf)


@pytest.fixture(scope="module")
def tiny_llm(tiny):
    return LLM(tiny, prefill_grid=8, decode_grid=8, max_model_len=64, band=False)


@pytest.fixture(scope="module")
def tiny_ref(tiny):
    return ReferenceEngine(tiny, max_model_len=64)


@pytest.fixture(scope="module")
def small_wafer(tmp_path_factory):
    p = tmp_path_factory.mktemp("wafer") / "small.toml"
    p.write_text(f'base = "wse2"\nname = "small"\nsram_bytes_per_pe = {SMALL_SRAM}\n')
    return str(p)


def run(capsys, *args, stdin: str | None = None, monkeypatch=None):
    """main() on args: (exit code, stdout, stderr with whitespace collapsed, wall seconds)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    t0 = time.perf_counter()
    rc = main([str(a) for a in args])
    wall = time.perf_counter() - t0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "Traceback" not in cap.out
    return rc, cap.out, " ".join(cap.err.split()), wall


def refused(capsys, *args, match: str, fast: float = 10.0):
    """The command is refused with one error line matching ``match``, within ``fast`` seconds."""
    rc, out, err, wall = run(capsys, *args)
    assert rc == 2, (out, err)
    assert err.startswith("error:") and err.count("error:") == 1, err
    assert re.search(match, err), err
    assert wall < fast, f"took {wall:.1f} s"
    return err


# ---------------------------------------------------------------- tracebacks (now clean errors)


def test_generate_bf16_is_refused_before_the_model_loads(capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("waferllm.models.loader.resolve_model", no_load)
    refused(capsys, "generate", "--prompt", "hi", "--dtype", "bf16", match=r"--dtype must be one of fp16, fp32, got 'bf16'")
    refused(capsys, "generate", "--prompt", "hi", "--kv-scheme", "ring",
            match=r"--kv-scheme must be one of shift, concat, got 'ring'")


def test_predict_int8_is_refused(capsys):
    refused(capsys, "predict", "--model", "smollm2-135m", "--dtype", "int8",
            match=r"dtype must be one of fp16, fp32, got 'int8'")


def test_reference_engine_refuses_wafer_options_instead_of_ignoring_them(capsys, tiny_gguf, tmp_path):
    trace = tmp_path / "t.json"
    err = refused(capsys, "generate", "--engine", "reference", "--model", tiny_gguf, "--prompt", "hi",
                  "--trace", trace, match=r"--trace only applies to the wafer engine; --engine reference runs the dense")
    assert "use --engine wafer" in err and not trace.exists()
    err = refused(capsys, "generate", "--engine", "reference", "--prompt", "hi", "--prefill-grid", "0", "--dtype", "bf16",
                  match=r"--prefill-grid, --dtype only apply to the wafer engine; --engine reference runs the dense "
                        r"numpy forward on the host\. Drop them \(the wafer engine would refuse them too: --prefill-grid "
                        r"must be a positive integer")
    assert "use --engine wafer" not in err  # not offered: it would not work either
    refused(capsys, "generate", "--engine", "reference", "--prompt", "hi", "--wafer", "nonsense",
            match=r"--wafer only applies to the wafer engine; .*Drop it \(the wafer engine would refuse it too: "
                  r"unknown wafer 'nonsense'")


def test_trace_with_the_wafer_engine_is_written_even_in_a_new_folder(capsys, tiny_gguf, tmp_path):
    trace = tmp_path / "out" / "run.json"
    rc, out, err, _ = run(capsys, "generate", "--model", tiny_gguf, "--prompt", "hi", "-n", "2", "--json",
                          "--prefill-grid", "8", "--decode-grid", "8", "--trace", trace)
    assert rc == 0 and json.loads(out)["token_ids"]
    assert json.loads(trace.read_text())["traceEvents"] and f"trace written to {trace}" in err


def test_a_trace_that_cannot_be_written_loses_nothing_else(capsys, tiny_gguf, tmp_path, monkeypatch):
    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("waferllm.mesh.ledger.Ledger.write_trace", disk_full)
    rc, out, err, _ = run(capsys, "generate", "--model", tiny_gguf, "--prompt", "hi", "-n", "2", "--json",
                          "--prefill-grid", "8", "--decode-grid", "8", "--trace", tmp_path / "t.json")
    assert rc == 2 and len(json.loads(out)["token_ids"]) == 2  # the run's output is there
    assert "error: --trace " in err and "cannot write the trace (No space left on device); the run's output is above" in err


def test_trace_to_a_directory_is_refused_before_the_run(capsys, tmp_path):
    refused(capsys, "generate", "--prompt", "hi", "--trace", tmp_path, match=r"--trace .*: is a directory; give a file name")


def test_api_generate_of_a_number_is_a_clear_error(tiny_llm, tiny_ref):
    for eng in (tiny_llm, tiny_ref):
        with pytest.raises(RequestError, match=r"prompts must be a string, a list of token ids, a chat message list.*got int"):
            eng.generate(123)
        with pytest.raises(RequestError, match=r"prompt 1 must be .*got float"):
            eng.generate(["ok", 1.5])


def test_api_accepts_a_dict_of_sampling_params_like_vllm_kwargs(tiny_llm, tiny_ref):
    for eng in (tiny_llm, tiny_ref):
        out = eng.generate("hi", {"max_tokens": 2, "temperature": 0})[0]
        assert len(out.token_ids) == 2 and out.finish_reason == "length"
        assert out.token_ids == eng.generate("hi", SamplingParams(max_tokens=2, temperature=0))[0].token_ids
        with pytest.raises(RequestError, match=r"unknown sampling parameter\(s\) max_tokenz; known: max_tokens"):
            eng.generate("hi", {"max_tokenz": 2})
        with pytest.raises(RequestError, match=r"sampling_params must be a SamplingParams, a dict .*got str"):
            eng.generate("hi", "greedy")
        with pytest.raises(RequestError, match=r"2 SamplingParams for 1 prompts"):
            eng.generate("hi", [{"max_tokens": 1}, {"max_tokens": 1}])


def test_api_accepts_token_id_prompts_as_vllm(tiny_llm, tiny_ref, tiny):
    ids = tiny.tokenizer.encode("hello", add_special_tokens=True)
    greedy = SamplingParams(max_tokens=3, temperature=0)
    for eng in (tiny_llm, tiny_ref):
        by_text = eng.generate("hello", greedy)[0]
        for form in (ids, tuple(ids), np.array(ids), {"prompt_token_ids": ids}):
            out = eng.generate(form, greedy)[0]
            assert out.prompt is None and out.prompt_token_ids == ids and out.token_ids == by_text.token_ids
        two = eng.generate([ids, ids[:2]], greedy)
        assert [o.prompt_token_ids for o in two] == [ids, ids[:2]]
        assert eng.generate({"prompt": "hello"}, greedy)[0].token_ids == by_text.token_ids
        with pytest.raises(RequestError, match=r"token id 99999 is outside the vocabulary \[0, 272\)"):
            eng.generate([1, 99999])
        with pytest.raises(RequestError, match=r"token ids must all be integers, got 'a'"):
            eng.generate([1, "a"])
        with pytest.raises(RequestError, match=r"chat=True needs text or chat messages; token-id prompts"):
            eng.generate(ids, chat=True)
        with pytest.raises(RequestError, match=r"a prompt dict must be \{'prompt': str\} or \{'prompt_token_ids'"):
            eng.generate({"prompt_ids": ids})


def test_prompt_list_forms():
    assert as_prompt_list("a") == ["a"]
    assert as_prompt_list([1, 2]) == [[1, 2]]
    assert as_prompt_list([[1, 2], "b"]) == [[1, 2], "b"]
    conv = [{"role": "user", "content": "x"}]
    assert as_prompt_list(conv) == [conv] and as_prompt_list([conv, conv]) == [conv, conv]
    with pytest.raises(RequestError, match="no prompts given"):
        as_prompt_list([])
    with pytest.raises(RequestError, match=r"a chat message must come in a list of messages"):
        as_prompt_list({"role": "user", "content": "x"})


def test_llm_chat_as_in_vllm(tiny_llm, tiny_ref, tiny):
    conv = [{"role": "user", "content": "What is a wafer?"}]
    greedy = SamplingParams(max_tokens=2, temperature=0)
    for eng in (tiny_llm, tiny_ref):
        out = eng.chat(conv, greedy)[0]
        assert out.prompt == tiny.tokenizer.apply_chat_template(conv, add_generation_prompt=True)
        assert out.token_ids == eng.generate(conv, greedy)[0].token_ids  # a message list to generate() is a chat
        assert len(eng.chat([conv, conv], {"max_tokens": 1})) == 2
        custom = eng.chat(conv, greedy, chat_template="{{ messages[0]['content'] }}!")[0]
        assert custom.prompt == "What is a wafer?!"
        with pytest.raises(RequestError, match=r"chat\(\) takes messages .*use generate\(\) for plain text"):
            eng.chat("hi")
        with pytest.raises(RequestError, match=r"chat message must be a dict with 'role' and 'content'"):
            eng.chat([{"text": "hi"}])


# ---------------------------------------------------------------- silently wrong (now refused or right)


@pytest.mark.parametrize("flag", ["--prefill-grid", "--decode-grid"])
@pytest.mark.parametrize("value", ["0", "-3", "8x16", "abc", "1.5"])
def test_grid_zero_or_malformed_is_refused_not_auto(capsys, monkeypatch, flag, value):
    monkeypatch.setattr("waferllm.models.loader.resolve_model", lambda *a: pytest.fail("model loaded"))
    what = "must be square" if value == "8x16" else r"must be a positive integer P \(a PxP region\) or 'auto'"
    refused(capsys, "generate", "--prompt", "hi", flag, value, match=f"{flag} {what}")


def test_grid_larger_than_the_mesh_is_refused_before_loading(capsys, monkeypatch):
    monkeypatch.setattr("waferllm.models.loader.resolve_model", lambda *a: pytest.fail("model loaded"))
    refused(capsys, "generate", "--prompt", "hi", "--decode-grid", "100000",
            match=r"--decode-grid 100000 does not fit the 750x994 mesh of wse2 \(largest square: 750x750\)")


def test_api_grids_zero_are_refused_like_the_cli():
    for kw in (dict(prefill_grid=0), dict(decode_grid="0"), dict(prefill_grid=True), dict(decode_grid=(8, 16))):
        with pytest.raises(RequestError, match=r"(prefill|decode)_grid must be"):
            LLM("never-loaded.gguf", **kw)


def test_max_model_len_zero_is_refused_not_512(capsys, monkeypatch):
    monkeypatch.setattr("waferllm.models.loader.resolve_model", lambda *a: pytest.fail("model loaded"))
    refused(capsys, "generate", "--prompt", "hi", "--max-model-len", "0",
            match=r"--max-model-len must be a positive number of tokens, got 0")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(RequestError, match=r"max_model_len must be a positive integer"):
            LLM("never-loaded.gguf", max_model_len=bad)


def test_model_context_is_enforced_in_generate(capsys, tiny_gguf, tiny):
    refused(capsys, "generate", "--model", tiny_gguf, "--prompt", "hi", "--max-model-len", "9000",
            match=r"--max-model-len 9000 is more than tiny.gguf's context of 256 tokens: use at most --max-model-len 256")
    with pytest.raises(RequestError, match=r"max_model_len 9000 is more than tiny.gguf's context of 256 tokens"):
        LLM(tiny, max_model_len=9000)
    with pytest.raises(RequestError, match=r"max_model_len 300 is more than tiny.gguf's context of 256"):
        ReferenceEngine(tiny, max_model_len=300)


def test_model_context_is_enforced_in_predict(capsys):
    refused(capsys, "predict", "--model", "llama3-8b", "--input-len", "16384",
            match=r"input_len 16384 \+ output_len 128 = 16512 tokens is more than llama3-8b's context of 8192 tokens")
    cfg = tiny_config()
    with pytest.raises(RequestError, match=r"more than tiny's context of 256 tokens \(max_position_embeddings\): shorten "
                                           r"the request to at most 256 tokens in all, or allow_beyond_context=True"):
        predict(cfg, WSE2, 250, 10, 8, 8, gpus=False, band=False)
    m = predict(cfg, WSE2, 250, 10, 8, 8, gpus=False, band=False, allow_beyond_context=True)
    assert m["input_len"] == 250 and m["ttft_s"] > 0


def test_predict_allow_beyond_context_flag(capsys):
    rc, out, err, _ = run(capsys, "predict", "--model", "smollm2-135m", "--input-len", "8190", "--output-len", "4",
                          "--prefill-grid", "750", "--decode-grid", "360", "--extrapolate-from-layers", "1",
                          "--allow-beyond-context", "--json")
    assert rc == 0, err
    assert json.loads(out)["input_len"] == 8190


def test_enormous_lengths_are_refused_quickly(capsys):
    refused(capsys, "predict", "--model", "smollm2-135m", "--input-len", "1000000000", "--allow-beyond-context",
            match=r"is more than the 131,072 tokens a prediction runs", fast=5)
    refused(capsys, "predict", "--model", "smollm2-135m", "--output-len", str(10 ** 12),
            match=r"input_len 2048 \+ output_len 1000000000000 is more than the 131,072 tokens", fast=5)
    refused(capsys, "predict", "--model", "smollm2-135m", "--output-len", "100000",
            match=r"is more than smollm2-135m's context of 8192 tokens", fast=5)
    refused(capsys, "hardware", "wse2", "--set", "rows=100000000", match=r"rows must be at most 2,048 PEs", fast=5)


def test_logprobs_without_json_are_shown(capsys, tiny_gguf):
    rc, out, err, _ = run(capsys, "generate", "--engine", "reference", "--model", tiny_gguf, "--prompt", "hi",
                          "-n", "3", "--logprobs", "2")
    assert rc == 0, err
    lines = out.splitlines()
    head = lines.index("logprobs: each generated token and its logprob, then the 2 most likely tokens at that step")
    rows = lines[head + 1:]
    assert len(rows) == 3 and all(re.match(r"\s+\d+ '.*' -?\d+\.\d{4}   top: '.*' -?\d+\.\d{4}, '.*' -?\d+\.\d{4}$", r)
                                  for r in rows), rows


def test_api_default_max_model_len_is_the_context_when_the_wafer_holds_it(tiny):
    llm = LLM(tiny, prefill_grid=8, decode_grid=8, band=False)
    assert llm.max_model_len == 256 and llm.max_model_len_reason == "default: tiny.gguf's context"


def test_api_default_max_model_len_is_what_the_wafer_holds_and_says_so(tiny):
    llm = LLM(tiny, wafer_overrides={"sram_bytes_per_pe": SMALL_SRAM}, band=False)
    small = get_wafer("wse2", sram_bytes_per_pe=SMALL_SRAM)
    n = llm.max_model_len
    seqs = llm.max_num_seqs  # the decode KV pool holds this many whole contexts
    assert seqs == 4
    assert 1 < n < 256 and n == _longest_fitting(tiny.config, small, {"prefill": 48, "decode": 48}, 256, "fp16",
                                                 seqs=seqs)
    assert phase_fits(tiny.config, small, 48, "decode", n, max_num_seqs=seqs)
    assert phase_fits(tiny.config, small, 48, "prefill", n)
    # the longest: one more token does not fit
    assert not (phase_fits(tiny.config, small, 48, "decode", n + 1, max_num_seqs=seqs)
                and phase_fits(tiny.config, small, 48, "prefill", n + 1))
    assert llm.plan.decode.seq_len == n * seqs  # the pool
    assert llm.max_model_len_reason == ("default: the longest context tiny.gguf fits on wse2 for 4 requests at once "
                                        "(max_num_seqs) with prefill grids up to 48 and decode grids up to 48 "
                                        "(tiny.gguf allows 256)")
    assert llm.run.max_seq_len == n and llm.generate("hi", {"max_tokens": 1})[0].metrics["max_model_len"] == n


def test_cli_default_max_model_len_fits_the_request_and_is_stated(capsys, tiny_gguf):
    rc, out, err, _ = run(capsys, "generate", "--model", tiny_gguf, "--prompt", "hello", "-n", "3", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert "max_model_len 8: the prompt's 5 tokens + --max-tokens 3 (--max-model-len reserves more)" in err
    assert d["metrics"]["max_model_len"] == 8 and len(d["prompt_token_ids"]) == 5


# ---------------------------------------------------------------- misleading messages (now checked)


def test_predict_bad_lengths_and_layers_are_refused_upfront(capsys):
    for args, match in ((("--input-len", "0"), r"input_len must be a positive integer, got 0"),
                        (("--output-len", "0"), r"output_len must be a positive integer, got 0"),
                        (("--extrapolate-from-layers", "0"), r"must be a whole number from 1 to 32 \(llama3-8b has 32 layers\), got 0"),
                        (("--extrapolate-from-layers", "99"), r"must be a whole number from 1 to 32 .*got 99")):
        err = refused(capsys, "predict", *args, match=match, fast=5)
        assert "on any grid tried" not in err


def test_advice_to_use_a_grid_is_checked_and_works(capsys, tiny_gguf, small_wafer):
    """The issue's case on a tiny model: a context the tuned grids (up to 48) cannot hold. The
    advice names a grid that was planned; following it works; no flag generate lacks."""
    err = refused(capsys, "generate", "--model", tiny_gguf, "--wafer", small_wafer, "--prompt", "hello",
                  "-n", "3", "--max-model-len", "256", match=r"tiny.gguf does not fit small with max_model_len 256: "
                  r"prefill on any grid up to 48x48")
    assert "--extrapolate-from-layers" not in err
    g = int(re.search(r"prefill_grid=(\d+) \(--prefill-grid \1\)", err).group(1))
    assert g > 48
    small = get_wafer(small_wafer)
    cfg = load_model(tiny_gguf).config
    assert phase_fits(cfg, small, g, "prefill", 256) and not phase_fits(cfg, small, g - 1, "prefill", 256)
    longest = int(re.search(r"max_model_len=(\d+) \(--max-model-len \1\) on these grids", err).group(1))
    assert phase_fits(cfg, small, 48, "prefill", longest) and not phase_fits(cfg, small, 48, "prefill", longest + 1)
    # following the advice: a run on the suggested grid, and one with the suggested context
    rc, out, err2, _ = run(capsys, "generate", "--model", tiny_gguf, "--wafer", small_wafer, "--prompt", "hello",
                           "-n", "3", "--max-model-len", "256", "--prefill-grid", g, "--json")
    assert rc == 0, err2
    rc, out, err3, _ = run(capsys, "generate", "--model", tiny_gguf, "--wafer", small_wafer, "--prompt", "hello",
                           "-n", "3", "--max-model-len", longest, "--json")
    assert rc == 0, err3


def test_without_max_model_len_the_advice_is_a_shorter_request(capsys, tiny_gguf, small_wafer, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("x" * 250)
    err = refused(capsys, "generate", "--model", tiny_gguf, "--wafer", small_wafer, "--prompt-file", prompt, "-n", "4",
                  match=r"for a context of 254 tokens \(the prompt's 250 \+ --max-tokens 4\): prefill on any grid up to")
    assert "--prefill-grid " in err and "prefill_grid=" not in err and "--max-model-len" not in err
    assert re.search(r"a shorter request: at most \d+ tokens in all \(the prompt has 250; shorten the prompt\)", err)


def test_placement_advice_is_planned_for_both_phases_and_kv():
    """The planner's own suggestion (predict's message) fits the phase it names, KV cache included."""
    cfg = tiny_config()
    p = plan(cfg, WSE2, None, 4, 32, "fp16")
    with pytest.raises(PlacementError) as exc:
        plan(cfg, WSE2, None, 4, p.kv_capacity_tokens * 8, "fp16")
    g = exc.value.context["fit_grid"]
    assert g and phase_fits(cfg, WSE2, g, "decode", p.kv_capacity_tokens * 8)
    assert f"A {g}x{g} grid would fit (checked by planning it)" in str(exc.value)
    assert "--extrapolate-from-layers K" in str(exc.value)  # predict has it
    with pytest.raises(PlacementError, match=r"the KV cache for 2176 tokens does not fit the 28x28 decode regions "
                                             r"\(capacity \d+ tokens with the shift-based cache\); a \d+x\d+ decode grid holds it"):
        plan(get_model_preset("llama3-8b"), WSE2, None, 28, 2176, "fp16", layers=1)


def test_no_region_can_hold_a_layer_says_why():
    with pytest.raises(PlacementError, match=r"the activations and vocabulary slices alone take more, so no region "
                                             r"can hold a layer") as exc:
        plan(get_model_preset("smollm2-135m"), WSE2, 48, None, 6000, "fp16")
    assert re.search(r"all [\d,]+ regions \(48x48 and the smaller squares around them, 745,432 PEs\)", str(exc.value))


def test_max_tokens_beyond_the_context_names_the_flag_before_placement(capsys, tiny_gguf, monkeypatch):
    def no_llm(*a, **k):
        raise AssertionError("the model was placed")

    monkeypatch.setattr("waferllm.engine.llm.LLM.__init__", no_llm)
    refused(capsys, "generate", "--model", tiny_gguf, "--prompt", "hi", "--max-tokens", "100000",
            match=r"--max-tokens 100000 is more than tiny.gguf's context of 256 tokens, which holds the prompt "
                  r"\(2 tokens\) and the output: use at most --max-tokens 254")
    refused(capsys, "generate", "--model", tiny_gguf, "--prompt", "hello", "-n", "10", "--max-model-len", "12",
            match=r"the prompt \(5 tokens\) \+ --max-tokens 10 = 15 tokens do not fit --max-model-len of 12: use at "
                  r"most --max-tokens 7, or raise --max-model-len \(up to 256\)")
    refused(capsys, "generate", "--prompt", "hi", "-n", "50", "--max-model-len", "40",
            match=r"--max-tokens 50 leaves no room for the prompt in --max-model-len 40")


def test_api_max_tokens_error_names_what_to_change(tiny_llm):
    with pytest.raises(RequestError, match=r"prompt \(2 tokens\) \+ max_tokens \(100\) = 102 exceeds max_model_len 64: "
                                           r"lower max_tokens to at most 62, or raise max_model_len \(up to 256"):
        tiny_llm.generate("hi", {"max_tokens": 100})


def test_requests_are_all_checked_before_any_runs(tiny_llm, monkeypatch):
    ran = []
    monkeypatch.setattr(tiny_llm, "generate_ids", lambda *a, **k: ran.append(1))
    with pytest.raises(RequestError, match="exceeds max_model_len 64"):
        tiny_llm.generate(["ok", "fine"], [{"max_tokens": 1}, {"max_tokens": 1000}])
    assert not ran


def test_empty_prompt_is_refused_before_loading(capsys, monkeypatch):
    monkeypatch.setattr("waferllm.models.loader.resolve_model", lambda *a: pytest.fail("model loaded"))
    refused(capsys, "generate", "--prompt", "", match=r"the prompt is empty \(--prompt\)", fast=3)


# ---------------------------------------------------------------- habits of the ecosystem


def test_version(capsys):
    from waferllm import __version__

    rc, out, _, _ = run(capsys, "--version")
    assert rc == 0 and out.strip() == f"waferllm {__version__}"


def test_python_dash_m_waferllm():
    p = subprocess.run([sys.executable, "-m", "waferllm", "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("waferllm ")
    p = subprocess.run([sys.executable, "-m", "waferllm", "hardware", "wse2", "--set", "rows=0"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "rows must be > 0" in p.stderr and "Traceback" not in p.stderr


def test_prompt_from_stdin_and_from_a_file(capsys, monkeypatch, tiny_gguf, tmp_path):
    base = ["generate", "--engine", "reference", "--model", tiny_gguf, "-n", "1", "--json"]
    rc, out, err, _ = run(capsys, *base, "--prompt", "-", stdin="hello\n", monkeypatch=monkeypatch)
    assert rc == 0, err
    assert json.loads(out)["prompt"] == "hello"  # the newline echo adds is dropped
    f = tmp_path / "p.txt"
    f.write_text("hello there\n\n", encoding="utf-8")
    rc, out, err, _ = run(capsys, *base, "--prompt-file", f)
    assert rc == 0 and json.loads(out)["prompt"] == "hello there\n"
    rc, out, err, _ = run(capsys, *base, "--prompt-file", "-", stdin="from stdin", monkeypatch=monkeypatch)
    assert rc == 0 and json.loads(out)["prompt"] == "from stdin"
    refused(capsys, *base, "--prompt-file", tmp_path / "missing.txt", match=r"--prompt-file .*missing.txt: no such file")
    refused(capsys, *base, "--prompt", "a", "--prompt-file", f, match=r"give the prompt once")
    refused(capsys, *base[:-1], match=r"no prompt: give --prompt TEXT, --prompt - \(read stdin\) or --prompt-file FILE")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    refused(capsys, *base, "--prompt-file", tmp_path / "bin", match=r"not UTF-8 text")
    (tmp_path / "empty").write_text("\n")
    refused(capsys, *base, "--prompt-file", tmp_path / "empty", match=r"the prompt is empty \(--prompt-file")


def test_boolean_flags_have_their_no_form(capsys, tiny_gguf):
    base = ["generate", "--engine", "reference", "--model", tiny_gguf, "--prompt", "hi", "-n", "1"]
    rc, out, _, _ = run(capsys, *base, "--json", "--no-json")
    assert rc == 0 and not out.lstrip().startswith("{")
    rc, out, _, _ = run(capsys, *base, "--no-chat", "--json")
    assert rc == 0 and json.loads(out)["prompt"] == "hi"
    rc, out, _, _ = run(capsys, "hardware", "wse2", "--json", "--no-provenance")
    assert rc == 0 and "constants" not in json.loads(out)
    rc, out, _, _ = run(capsys, "hardware", "--help")
    assert "--no-json" in out and "<bool>" not in out


def test_help_says_which_options_apply_to_which_engine(capsys):
    rc, out, _, _ = run(capsys, "generate", "--help")
    assert rc == 0
    text = " ".join(out.split())
    start = text.index("Request")  # the panels follow the description
    wafer = text.index("Wafer engine only (--engine wafer, the default)")
    both = text.index("Engine and model (both engines)")
    sampling = text.index("Sampling (both engines)")

    def row(flag):
        return text.index(f"│ {flag} ", start)

    for flag in ("--wafer", "--prefill-grid", "--decode-grid", "--dtype", "--kv-scheme", "--trace"):
        assert row(flag) > wafer, flag
    for flag in ("--max-model-len", "--engine", "--model"):
        assert both < row(flag) < wafer, flag
    for flag in ("--temperature", "--top-p", "--seed"):
        assert sampling < row(flag) < both, flag
    assert "<bool>" not in out


def test_readme_usage_lines_parse():
    """Every `waferllm ...` line of the README's usage parses with the CLI's own parser (flags
    exist, values have the right types); nothing is run."""
    import shlex

    import typer

    from waferllm.interfaces.cli import _conventions, _register, app

    _register()
    group = typer.main.get_command(app)
    _conventions(group)
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", readme, flags=re.S))
    blocks = re.sub(r"\\\n\s*", " ", blocks)  # continuation lines
    lines = re.findall(r"^waferllm [^\n]*$", blocks, flags=re.M)
    assert len(lines) >= 8
    for ln in lines:
        code = ln.split("  #")[0].split(" # ")[0].strip()
        if code.endswith(" ...") and not code.endswith('"..."'):  # "and so on"
            code = code[:-4]
        args = [a.strip("[]") for a in shlex.split(code)[1:]]
        name = args[0]
        sub = group.commands[name]
        if hasattr(sub, "commands") and len(args) > 1 and args[1] in sub.commands:
            sub, name, args = sub.commands[args[1]], args[1], args[1:]
        sub.make_context(name, args[1:])  # raises click's UsageError on an unknown flag or a bad value


def test_internal_errors_print_one_line_not_a_traceback(capsys, monkeypatch):
    def boom(*a, **k):
        raise ValueError("boom")

    monkeypatch.setattr("waferllm.interfaces.cmd_hardware.get_wafer", boom)
    rc, out, err, _ = run(capsys, "hardware", "wse2")
    assert rc == 1 and err.startswith("error: internal error (ValueError: boom). This is a bug in waferllm")

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("waferllm.interfaces.cmd_hardware.get_wafer", interrupt)
    rc, out, err, _ = run(capsys, "hardware", "wse2")
    assert rc == 130 and "error" not in err  # click's own Ctrl-C handling: exit 130, no traceback


def test_error_messages_with_brackets_are_printed_verbatim(capsys, tiny_gguf):
    """Rich markup in a message ([0, 272), [bold]) is printed as text, not interpreted."""
    refused(capsys, "hardware", "[bold]x[/]", match=r"unknown wafer '\[bold\]x\[/\]'")


# ---------------------------------------------------------------- deep errors carry their context


def test_placement_errors_inside_llm_name_what_was_being_placed(tiny, monkeypatch):
    def overflow(*a, **k):
        from waferllm.errors import SRAMOverflowError

        raise SRAMOverflowError("region decode[0]: PE (0, 0) needs 1 B more")

    monkeypatch.setattr("waferllm.engine.llm.WaferModel", overflow)
    with pytest.raises(WaferLLMError, match=r"placing tiny.gguf on wse2 \(prefill 8x8, decode 8x8, max_model_len 16\): "
                                            r"region decode\[0\]: PE \(0, 0\)"):
        LLM(tiny, prefill_grid=8, decode_grid=8, max_model_len=16)


def test_with_context_keeps_the_type_and_details():
    e = with_context(PlacementError("x", phase="decode"), "placing m")
    assert isinstance(e, PlacementError) and str(e) == "placing m: x" and e.context == {"phase": "decode"}


def test_corrupt_weights_name_the_file_and_the_tensor(tmp_path):
    w = random_weights(tiny_config())
    w.layers[1].wv[3, 2] = np.nan
    path = write_gguf(str(tmp_path / "nan.gguf"), w)
    m = load_model(path)
    m.weights.layers[0]
    with pytest.raises(ModelError, match=r"nan.gguf: tensor 'blk.1.attn_v.weight' holds 1 non-finite value\(s\) "
                                         r"\(NaN or inf\): the file is corrupt"):
        m.weights.layers[1]


# ---------------------------------------------------------------- sampling parameters and wafer values


@pytest.mark.parametrize("kw, match", [
    (dict(seed=-1), r"seed must be None or an integer >= 0, got -1"),
    (dict(stop=5), r"stop must be a string or a list of strings, got 5"),
    (dict(stop_token_ids=3), r"stop_token_ids must be a list of token ids, got 3"),
    (dict(ignore_eos="yes"), r"ignore_eos must be True or False, got 'yes'"),
    (dict(temperature=math.nan), r"temperature must be a finite number >= 0"),
    (dict(top_p=math.inf), r"top_p must be in \(0, 1\]"),
])
def test_sampling_params_refuse_what_would_crash_later(kw, match):
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kw)


@pytest.mark.parametrize("setting, match", [
    ("rows=5000", r"rows must be at most 2,048 PEs \(more than any wafer holds\), got '5000'"),
    ("clock_hz=1e300", r"clock_hz must be at most 1e\+15 Hz, got '1e300'"),
    ("clock_hz=1e-300", r"clock_hz must be at least 1e-06 Hz, got '1e-300'"),
    ("beta_cycles=nan", r"beta_cycles must be finite, got 'nan'"),
    ("beta_cycles=-inf", r"beta_cycles must be finite, got '-inf'"),
    ("sram_bytes_per_pe=0", r"sram_bytes_per_pe must be > 0, got '0'"),
    ("rows=", r"override 'rows=' has no VALUE after '='"),
    ("=5", r"override '=5' has no KEY before '='"),
])
def test_set_values_out_of_range_are_refused(capsys, setting, match):
    refused(capsys, "hardware", "wse2", "--set", setting, match=match, fast=5)


def test_wafer_files_that_loop_or_nest_are_refused(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(f'base = "{b}"\n')
    b.write_text(f'base = "{a}"\n')
    with pytest.raises(HardwareError, match=r"its chain of bases comes back to itself"):
        get_wafer(str(a))
    deep = tmp_path / "deep.json"
    deep.write_text('{"rows": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(HardwareError, match=r"deep.json: not valid JSON"):
        get_wafer(str(deep))
    big = tmp_path / "big.json"
    big.write_text('{"base": "wse2", "rows": 1' + "0" * 400 + "}")
    with pytest.raises(HardwareError, match=r"rows must be at most 1e\+15 PEs, got 10000000000000000000\.\.\.\(401 characters\)"):
        get_wafer(str(big))
    bad = tmp_path / "bad.json"
    bad.write_text('{"base": "wse2", "defective_pes": [[1.5, 2]]}')
    with pytest.raises(HardwareError, match=r"defective_pes must be a list of \[row, col\] pairs of whole numbers"):
        get_wafer(str(bad))
    with pytest.raises(HardwareError, match=r"unknown wafer 'a{19}\.\.\.\(5002 characters\): not a preset \(wse2, wse3\) nor an existing file"):
        get_wafer("a" * 5000)


def test_text_report_says_how_the_prompt_is_padded(capsys, tiny_gguf):
    """TTFT moves in steps of the prefill grid: the summary line says so, with the padded length."""
    rc, out, err, _ = run(capsys, "generate", "--model", tiny_gguf, "--prompt", "hello", "-n", "2",
                          "--prefill-grid", "8", "--decode-grid", "8")
    assert rc == 0, err
    assert ("[wafer] 5 prompt + 2 generated tokens, finish=length; the prompt runs padded to 8 tokens on the 8x8 "
            "prefill regions (TTFT grows in steps of 8 tokens)") in err


def test_api_model_that_fits_no_context_at_all_says_so(tiny):
    with pytest.raises(PlacementError, match=r"tiny.gguf does not fit wse2 with max_model_len 256 \(the default; not "
                                             r"even one token fits\): prefill on the given 8x8 grid(.|\n)*What would "
                                             r"fit \(each checked by planning it\): prefill_grid=\d+ \(--prefill-grid "
                                             r"\d+\)") as exc:
        LLM(tiny, prefill_grid=8, decode_grid=8, wafer_overrides={"sram_bytes_per_pe": SMALL_SRAM})
    fit = exc.value.context["fit_grids"]
    small = get_wafer("wse2", sram_bytes_per_pe=SMALL_SRAM)
    assert plan(tiny.config, small, fit["prefill"], fit.get("decode", 8), 256)  # the advice plans


def test_engines_report_progress_while_they_load(tiny):
    seen = []
    ReferenceEngine(tiny, progress=lambda done, total, what: seen.append((done, total, what)))
    assert seen == [(1, 2, "loading layer 0"), (2, 2, "loading layer 1")]
    seen.clear()
    LLM(tiny, max_model_len=16, band=False, progress=lambda done, total, what: seen.append((done, total, what)))
    assert seen[0] == (0, None, "tuning grids") and seen[-1][:2] == (4, 4) and "placing decode layer 1" in seen[-1][2]


def test_cli_shows_progress_bars_only_on_a_terminal(capsys, tiny_gguf, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    import waferllm.interfaces.cmd_generate as g

    calls = []
    real = g._progress
    monkeypatch.setattr(g, "_progress", lambda enabled: calls.append(enabled) or real(False))
    rc, out, err, _ = run(capsys, "generate", "--engine", "reference", "--model", tiny_gguf, "--prompt", "hi", "-n", "1")
    assert rc == 0 and calls == [True, True]  # loading the model, then the engine


def test_unknown_algorithm_is_refused_before_the_model_loads(capsys, monkeypatch):
    import waferllm.models.loader as loader

    def no_load(*a, **k):  # pragma: no cover - the request is refused first
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loader, "resolve_model", no_load)
    with pytest.raises(RequestError, match=r"decode_collectives must be one of paper, fused, got 'nope'"):
        LLM(decode_collectives="nope")
    err = refused(capsys, "predict", "--gemv-ktree", "fast", match=r"gemv_ktree must be one of paper, tuned")
    assert "Traceback" not in err
