"""A bounded fuzz of the command line (hypothesis) over combinations of options and values,
valid and not: no Python traceback ever reaches the user, every run exits 0 (it worked) or
2 (a clear error: `error: ...` or click's usage message), and every run ends quickly:
enormous lengths and meshes are refused, not computed.

Runs are in-process (`main()`), on a tiny random model for `generate` (a wafer run takes a
fraction of a second) and on small presets for `predict`, so the whole file stays within
about a minute on two cores. WAFERLLM_FUZZ_EXAMPLES=N runs N examples per test.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from waferllm.interfaces.cli import main
from waferllm.models.testing import random_weights, tiny_config, write_gguf, write_hf_checkpoint

N = int(os.environ.get("WAFERLLM_FUZZ_EXAMPLES", "0"))
RUN_LIMIT_S = 60  # no single run may take longer (most take well under a second)


def fuzz(examples: int):
    return settings(max_examples=N or examples, deadline=timedelta(seconds=RUN_LIMIT_S * 2), derandomize=not N,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-cli")
    w = random_weights(tiny_config())
    return {"gguf": write_gguf(str(d / "tiny.gguf"), w), "hf": write_hf_checkpoint(str(d / "tiny-hf"), w)}


def check_run(capsys, args: list[str]) -> tuple[int, str, str]:
    t0 = time.perf_counter()
    rc = main([str(a) for a in args])
    wall = time.perf_counter() - t0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out, args
    assert rc in (0, 2), (args, rc, cap.err[-2000:])
    if rc == 2:
        assert (cap.err + cap.out).strip(), args  # a refusal always says why (bare `waferllm`: the help)
        assert "internal error" not in cap.err, (args, cap.err)
    assert wall < RUN_LIMIT_S, (args, f"{wall:.1f} s")
    return rc, cap.out, cap.err


def options(pool: dict) -> st.SearchStrategy[list[str]]:
    """Some of the options in ``pool`` (flag -> values; a value of None: the flag alone), in any order."""
    def expand(items):
        out = []
        for flag, value in items:
            out += [flag] if value is None else [flag, str(value)]
        return out

    pairs = [st.tuples(st.just(flag), st.sampled_from(values)) for flag, values in pool.items()]
    return st.lists(st.one_of(pairs), max_size=6, unique_by=lambda fv: fv[0]).map(expand)


GRIDS = ["auto", "0", "-3", "4", "8", "12", "16x16", "8x16", "750", "751", "100000", "abc", "1.5"]
GENERATE = {
    "--engine": ["wafer", "reference", "gpu", "WAFER"],
    "--prompt": ["hello", "", "x" * 300, "🙂 wafer", "<s>"],
    "--chat": [None], "--no-chat": [None], "--json": [None], "--no-json": [None],
    "--max-tokens": ["1", "3", "0", "-1", "100000", str(10 ** 12)],
    "--max-model-len": ["0", "1", "6", "16", "64", "300", "9000"],
    "--prefill-grid": GRIDS, "--decode-grid": GRIDS,
    "--dtype": ["fp16", "fp32", "bf16", "int8"],
    "--kv-scheme": ["shift", "concat", "ring"],
    "--wafer": ["wse2", "wse3", "nope", "/nonexistent.toml"],
    "--temperature": ["0", "0.7", "-1", "nan", "inf"],
    "--top-k": ["-1", "0", "5", "-7", str(10 ** 12)],
    "--top-p": ["1", "0.5", "0", "2", "nan"],
    "--seed": ["0", "7", "-1", str(2 ** 70)],
    "--logprobs": ["0", "2", "-1", str(10 ** 9)],
    "--stop": ["", "a", "\n"],
    "--ignore-eos": [None],
    "--bogus": [None, "1"],
}


@pytest.mark.timeout(600)
@fuzz(30)
@given(opts=options(GENERATE), fmt=st.sampled_from(["gguf", "hf"]))
def test_generate(capsys, models, tmp_path_factory, opts, fmt):
    rc, out, err = check_run(capsys, ["generate", "--model", models[fmt], *opts])
    if rc == 0 and "--json" in opts and "--no-json" not in opts[opts.index("--json"):]:
        d = json.loads(out)
        assert d["token_ids"] and d["finish_reason"] in ("length", "stop")


VALID_SAMPLING = {
    "--chat": [None], "--no-chat": [None], "--json": [None], "--max-tokens": ["1", "2", "4"],
    "--temperature": ["0", "0.7", "1.5"], "--top-k": ["-1", "3"], "--top-p": ["1", "0.5"], "--seed": ["0", "7"],
    "--logprobs": ["0", "2"], "--stop": ["a", "\n"], "--ignore-eos": [None], "--max-model-len": ["64", "256"],
}
VALID_WAFER = {
    "--prefill-grid": ["auto", "8", "12"], "--decode-grid": ["auto", "4", "8", "12"], "--dtype": ["fp16", "fp32"],
    "--kv-scheme": ["shift", "concat"], "--wafer": ["wse2", "wse3"],
}


@pytest.mark.timeout(600)
@fuzz(12)
@given(engine=st.sampled_from(["wafer", "reference"]), sampling=options(VALID_SAMPLING), wafer=options(VALID_WAFER))
def test_generate_valid_combinations_all_run(capsys, models, engine, sampling, wafer):
    """Valid combinations run to the end (exit 0), on either engine."""
    args = ["generate", "--model", models["gguf"], "--prompt", "hello", "--engine", engine, *sampling]
    rc, out, err = check_run(capsys, args + (wafer if engine == "wafer" else []))
    assert rc == 0, (args, err)


PREDICT = {
    "--model": ["smollm2-135m", "tiny-config", "llama3-70b", "nope"],
    "--input-len": ["1", "8", "64", "0", "-5", "300", "9000", str(10 ** 9)],
    "--output-len": ["1", "4", "0", "300", str(10 ** 12)],
    "--prefill-grid": ["48", "48", "48", "auto", "0", "8", "750", "751", "100000", "x"],
    "--decode-grid": ["48", "48", "48", "auto", "0", "8", "750", "100000", "x"],
    "--extrapolate-from-layers": ["1", "2", "0", "99", "-1"],
    "--dtype": ["fp16", "fp32", "int8"],
    "--kv-scheme": ["shift", "concat", "ring"],
    "--set": ["beta_cycles=40", "rows=0", "rows=100000000", "clock_hz=nan", "sram_bytes_per_pe=inf",
              "reserved_bytes_per_pe=49152", "cols=1e400", "bogus=1", "rows", "rows=", "alpha_cycles=1e300"],
    "--allow-beyond-context": [None],
    "--json": [None],
}


@pytest.mark.timeout(600)
@fuzz(25)
@given(opts=options(PREDICT))
def test_predict(capsys, models, opts):
    opts = [os.path.join(models["hf"], "config.json") if o == "tiny-config" else o for o in opts]
    if "--model" not in opts:
        opts = ["--model", "smollm2-135m", *opts]
    if "--input-len" not in opts:
        opts += ["--input-len", "32"]
    if "--output-len" not in opts:
        opts += ["--output-len", "2"]
    for flag in ("--prefill-grid", "--decode-grid"):  # keep most runs off the (slower) tuner
        if flag not in opts:
            opts += [flag, "48"]
    check_run(capsys, ["predict", *opts])


HARDWARE = {
    "--set": ["rows=100", "rows=0", "rows=2049", "rows=1e400", "clock_hz=nan", "clock_hz=-inf", "beta_cycles=0",
              "power_w=1e300", "sram_bytes_per_pe=1", "reserved_bytes_per_pe=1e9", "defective_pes=1,2", "name=x",
              "=1", "noequals", "ops_exp=1e-9"],
    "--json": [None], "--no-json": [None], "--provenance": [None],
}


@pytest.mark.timeout(300)
@fuzz(40)
@given(name=st.sampled_from(["wse2", "wse3", "WSE2", "nope", "", "a" * 300]), opts=options(HARDWARE))
def test_hardware(capsys, name, opts):
    rc, out, err = check_run(capsys, ["hardware", name, *opts])
    if rc == 0 and "--json" in opts and "--no-json" not in opts:
        assert "NaN" not in out and "Infinity" not in out
        json.loads(out)


TOKENS = ["generate", "predict", "hardware", "bench", "validate", "--json", "--no-json", "--help", "--version", "-V",
          "--prompt", "-p", "--model", "--max-tokens", "7", "-", "--", "--set", "x=1", "wse2", "--engine", "reference",
          "--prefill-grid", "0", "--extrapolate-from-layers", "bogus", "--input-len"]


@pytest.mark.timeout(300)
@fuzz(40)
@given(tokens=st.lists(st.sampled_from(TOKENS), max_size=6))
def test_argument_soup(capsys, models, tokens):
    """Arbitrary sequences of real tokens: click's usage errors, help, version or a clean error."""
    if "generate" in tokens and "--model" not in tokens:
        tokens = tokens + ["--model", models["gguf"]]  # never the (slower) embedded model
    if tokens[:1] == ["validate"] or ("generate" in tokens and "-" in tokens):
        tokens = tokens + ["--help"]  # validation of every preset; reading stdin
    if "predict" in tokens:
        tokens = tokens + ["--prefill-grid", "48", "--decode-grid", "48", "--model", "smollm2-135m",
                           "--input-len", "16", "--output-len", "2"]
    check_run(capsys, tokens)
