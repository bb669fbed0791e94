"""Fuzzed inputs (hypothesis): model files and wafer descriptions.

A small GGUF and a small safetensors checkpoint (written by waferllm.models.testing) are
truncated, have bytes flipped and their headers edited; wafer TOML/JSON files and `--set`
values get NaN, infinities, zeros, huge numbers and junk. Every case must either load
correctly (the model: every layer built, the tokenizer working, one forward step; the
wafer: finite figures) or raise the project's error for that input (ModelError,
HardwareError), never another exception, and never hang.

Bounded for CI (2 cores): a fixed number of examples, derandomised so every run checks the
same cases; WAFERLLM_FUZZ_EXAMPLES=N runs N per test for a longer local hunt.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import warnings
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from waferllm.errors import HardwareError, ModelError, WaferLLMError
from waferllm.hardware.plmr import _FIELDS, MAX_MESH_SIDE, get_wafer, parse_overrides
from waferllm.models.loader import load_model
from waferllm.models.reference import ReferenceModel
from waferllm.models.testing import random_weights, tiny_config, write_gguf, write_hf_checkpoint

N = int(os.environ.get("WAFERLLM_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    return settings(max_examples=N or examples, deadline=timedelta(seconds=20), derandomize=not N, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


SMALL = dict(hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)


@pytest.fixture(scope="module")
def work():
    d = tempfile.mkdtemp(prefix="waferllm-fuzz-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def gguf_bytes(work):
    path = write_gguf(os.path.join(work, "orig.gguf"), random_weights(tiny_config(**SMALL)))
    data = open(path, "rb").read()
    import gguf

    return data, int(gguf.GGUFReader(path, "r").data_offset)  # header + metadata + tensor infos


@pytest.fixture(scope="module")
def hf_dir(work):
    return write_hf_checkpoint(os.path.join(work, "orig-hf"), random_weights(tiny_config(**SMALL)))


def load_fully(path: str) -> None:
    """Load, build every layer, use the tokenizer and run one forward step."""
    m = load_model(path)
    for i in range(len(m.weights.layers)):
        m.weights.layers[i]
    ids = m.tokenizer.encode("hello wafer")
    m.tokenizer.decode(ids)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ReferenceModel(m.weights).prefill([t % m.config.vocab_size for t in ids] or [0])


def loads_or_model_error(path: str) -> None:
    try:
        load_fully(path)
    except ModelError:
        pass  # the one acceptable failure; anything else propagates and fails the test


# ------------------------------------------------------------------------------------- GGUF


def _write(work: str, name: str, data: bytes) -> str:
    path = os.path.join(work, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


@fuzz(40)
@given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_gguf_truncated(work, gguf_bytes, cut):
    data, _ = gguf_bytes
    path = _write(work, "cut.gguf", data[: int(cut * len(data))])
    with pytest.raises(ModelError, match=r"cut.gguf: (not a GGUF file|truncated|corrupt)"):
        load_fully(path)


@fuzz(60)
@given(flips=st.lists(st.tuples(st.booleans(), st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)),
                      min_size=1, max_size=6))
def test_gguf_byte_flips(work, gguf_bytes, flips):
    data, header = gguf_bytes
    b = bytearray(data)
    for in_header, where, mask in flips:  # half the flips land in the header, metadata and tensor infos
        i = int(where * (header if in_header else len(b)))
        b[i] ^= mask
    loads_or_model_error(_write(work, "flip.gguf", bytes(b)))


INTERESTING = [0, 1, 2, 3, 7, 255, 2 ** 15, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 62, 2 ** 63, 2 ** 64 - 1]


@fuzz(60)
@given(edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.sampled_from([1, 2, 4, 8]),
                                st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2 ** 64 - 1))),
                      min_size=1, max_size=3))
def test_gguf_header_edits(work, gguf_bytes, edits):
    """Counts, lengths, types and offsets in the header overwritten with edge values."""
    data, header = gguf_bytes
    b = bytearray(data)
    for where, width, value in edits:
        i = 4 + int(where * (header - 12))  # after the magic
        b[i:i + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    loads_or_model_error(_write(work, "edit.gguf", bytes(b)))


# ------------------------------------------------------------------------------- safetensors


def _hf_copy(work: str, hf_dir: str, name: str) -> str:
    d = os.path.join(work, name)
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(hf_dir, d)
    return d


@fuzz(30)
@given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_safetensors_truncated(work, hf_dir, cut):
    d = _hf_copy(work, hf_dir, "cut-hf")
    f = os.path.join(d, "model.safetensors")
    data = open(f, "rb").read()
    _write(d, "model.safetensors", data[: int(cut * len(data))])
    with pytest.raises(ModelError, match=r"model.safetensors: corrupt"):
        load_fully(d)


@fuzz(50)
@given(flips=st.lists(st.tuples(st.booleans(), st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)),
                      min_size=1, max_size=6))
def test_safetensors_byte_flips(work, hf_dir, flips):
    d = _hf_copy(work, hf_dir, "flip-hf")
    data = bytearray(open(os.path.join(d, "model.safetensors"), "rb").read())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    for in_header, where, mask in flips:
        data[int(where * (header if in_header else len(data)))] ^= mask
    _write(d, "model.safetensors", bytes(data))
    loads_or_model_error(d)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.sampled_from([0, -1, 1, 2 ** 63])
                    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                    max_leaves=6)


@fuzz(60)
@given(data=st.data())
def test_safetensors_header_edits(work, hf_dir, data):
    """A tensor entry's dtype, shape or offsets replaced, an entry removed or added, the
    header's length prefix wrong."""
    d = _hf_copy(work, hf_dir, "hdr-hf")
    raw = open(os.path.join(d, "model.safetensors"), "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    op = data.draw(st.sampled_from(["field", "drop", "add", "length"]))
    if op == "field":
        name = data.draw(st.sampled_from(names))
        header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(JSON)
    elif op == "drop":
        header.pop(data.draw(st.sampled_from(names)))
    elif op == "add":
        header[data.draw(st.text(max_size=8))] = data.draw(JSON)
    text = json.dumps(header).encode()
    length = len(text) + (data.draw(st.integers(-len(text), 64)) if op == "length" else 0)
    _write(d, "model.safetensors", struct.pack("<Q", max(0, length)) + text + body)
    loads_or_model_error(d)


CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
               "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "model_type",
               "architectures", "attention_bias"]
ROPE = st.fixed_dictionaries({"rope_type": st.sampled_from(["llama3", "linear", "default", "yarn"])},
                             optional={"factor": JSON, "low_freq_factor": JSON, "high_freq_factor": JSON,
                                       "original_max_position_embeddings": JSON})


@fuzz(50)
@given(edits=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON | ROPE, min_size=1, max_size=3))
def test_hf_config_edits(work, hf_dir, edits):
    d = _hf_copy(work, hf_dir, "cfg-hf")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(edits)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    loads_or_model_error(d)


# ---------------------------------------------------------------------------- wafer files


NUM_TEXT = st.sampled_from(["nan", "-nan", "inf", "-inf", "0", "-0", "0.0", "-1", "1e-300", "1e300", "1e400",
                            str(2 ** 64), str(10 ** 30), "2049", "2048", "1", "0.5", "", "abc", "1e", "0x10", " 7 "])
VALUE = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2 ** 80, 2 ** 80),
                  st.sampled_from([0, -1, 1, 2 ** 63, 10 ** 400]), NUM_TEXT, st.booleans(), st.none(),
                  st.lists(st.integers(-5, 5), max_size=3))
KEYS = st.sampled_from(list(_FIELDS) + ["defective_pes", "name", "description", "base", "bogus"])


def _spec_is_sane(spec) -> None:
    s = spec.summary()
    for k, v in s.items():
        if isinstance(v, float):
            assert math.isfinite(v), (k, v)
    assert 1 <= spec.rows <= MAX_MESH_SIDE and 1 <= spec.cols <= MAX_MESH_SIDE


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps("" if v is None else str(v))


@fuzz(80)
@given(entries=st.dictionaries(KEYS, VALUE, min_size=1, max_size=5), as_table=st.booleans(),
       kind=st.sampled_from(["json", "toml"]))
def test_wafer_files(work, entries, as_table, kind):
    data = {"base": "wse2", **entries} if "base" not in entries else entries
    if as_table:
        data = {k: ({"value": v, "source": "fuzz", "status": "measured"} if k in _FIELDS else v) for k, v in data.items()}
    path = os.path.join(work, f"w.{kind}")
    if kind == "json":
        text = json.dumps(data, default=str)
    else:
        text = "\n".join(f"{k} = {{ value = {_toml_value(v['value'])}, status = \"measured\" }}" if isinstance(v, dict)
                         else f"{k} = {_toml_value(v)}" for k, v in data.items())
    with open(path, "w") as f:
        f.write(text)
    try:
        spec = get_wafer(path)
    except HardwareError:
        return
    _spec_is_sane(spec)


@fuzz(80)
@given(items=st.lists(st.tuples(KEYS, NUM_TEXT), min_size=1, max_size=4))
def test_set_values(items):
    try:
        spec = get_wafer("wse2", **parse_overrides([f"{k}={v}" for k, v in items]))
    except HardwareError:
        return
    _spec_is_sane(spec)


@fuzz(15)
@given(items=st.lists(st.tuples(st.sampled_from(["rows", "cols", "sram_bytes_per_pe", "reserved_bytes_per_pe",
                                                 "clock_hz", "alpha_cycles", "beta_cycles", "fp16_macs_per_cycle",
                                                 "link_bits_per_cycle", "routable_routes_per_pe", "power_w"]),
                               st.sampled_from(["1", "2", "8", "64", "4096", "0.5", "1e-6", "1e15", "1e12"])),
                     min_size=1, max_size=3))
def test_extreme_wafers_predict_or_refuse_quickly(items):
    """A wafer at the edge of the bounds still predicts a tiny model (finite figures) or is a
    clear error: no overflow, no endless planning."""
    from waferllm.engine.predict import predict

    try:
        spec = get_wafer("wse2", **parse_overrides([f"{k}={v}" for k, v in items]))
    except HardwareError:
        return
    g = max(1, min(8, spec.rows, spec.cols))
    try:
        with np.errstate(all="ignore"):
            m = predict(tiny_config(), spec, 8, 2, g, g, gpus=False, band=False)
    except WaferLLMError:
        return
    for k in ("ttft_s", "tpot_s", "energy_j"):
        assert math.isfinite(m[k]) and m[k] >= 0, (k, m[k])
