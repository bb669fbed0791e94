"""GGUF files: metadata, config, tokenizer data and dequantised float32 weights.

The file is memory-mapped and parsed by :class:`gguf.GGUFReader` (as
:class:`~waferllm.models.gguf_reader.FastGGUFReader`, which keeps big metadata arrays such
as the vocabulary lazily and decodes them in one pass); each tensor is dequantised by the
``gguf`` package (any quant type it supports; :func:`dequantize`) only when a layer is
first used. LLaMA-architecture GGUFs store ``attn_q``/``attn_k`` rows in llama.cpp's
interleaved RoPE order; :func:`unpermute_qk` restores the HF (rotate_half) order.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from waferllm.errors import ModelError
from waferllm.models.config import ModelConfig
from waferllm.models.weights import LayerWeights, LazyLayers, ModelWeights, expected_layer_shapes

GGUF_MAGIC = b"GGUF"
#: Archs whose Q/K rows llama.cpp's converter permutes into interleaved RoPE order.
_PERMUTED_ARCHS = ("llama", "mistral")
#: Metadata arrays worth converting to Python lists (everything else large is skipped).
_KEEP_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` on rows of a [n_head*D, ...] Q/K weight (or bias)."""
    out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute`` (HF order -> GGUF interleaved order); the inverse of :func:`unpermute_qk`."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_header(path: str) -> None:
    try:
        if not os.path.exists(path):
            raise ModelError(f"{path}: model file not found")
        if not os.path.isfile(path):
            raise ModelError(f"{path}: not a file")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model file ({exc.strerror or exc})") from None
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (bad magic {head[:4]!r}, expected b'GGUF')")
    if len(head) < 24:
        raise ModelError(f"{path}: truncated GGUF header ({size} bytes)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise ModelError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")


def check_finite(arr: np.ndarray, where: str, name: str) -> np.ndarray:
    """``arr`` if every value is finite; NaN or inf in a weight means a corrupt file."""
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ModelError(f"{where}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf): the file is corrupt")
    return arr


#: quantised bytes handed to the ``gguf`` package's row dequantiser per call
DEQUANT_CHUNK_BYTES = 128 << 10


def dequantize(data: np.ndarray, qtype) -> np.ndarray:
    """A GGUF tensor's values as float32 (numpy order), dequantised by the ``gguf`` package.

    The values are ``gguf.quants.dequantize``'s; only the batching differs. The library
    runs its per-type ``dequantize_rows`` on groups of 16 rows, a few Python calls per
    group (tens of thousands for an embedding table); here it runs on chunks of about
    :data:`DEQUANT_CHUNK_BYTES` and writes into one output array. Each block is decoded
    on its own, so the values are the same bit for bit (``tests/test_gguf_reader.py``
    checks every type with a row dequantiser against ``gguf.quants.dequantize``).
    ``data`` is read through a plain ndarray view: numpy's memmap subclass adds a Python
    call to every slice. Types without a row dequantiser (F32, F16, ...) go straight to
    ``gguf.quants.dequantize``.
    """
    from gguf import quants

    data = np.asarray(data)  # a plain ndarray view of the memory map
    cls = getattr(quants, getattr(qtype, "name", ""), None)
    if (not isinstance(cls, type) or getattr(cls, "qtype", None) != qtype or not hasattr(cls, "dequantize_rows")
            or data.dtype != np.uint8 or data.ndim == 0 or data.size == 0):
        return quants.dequantize(data, qtype)
    oshape = quants.quant_shape_from_byte_shape(data.shape, qtype)
    rows = data.reshape(-1, data.shape[-1])
    out = np.empty((rows.shape[0], oshape[-1]), dtype=np.float32)
    if hasattr(cls, "init_grid"):
        cls.init_grid()  # the i-quants' lookup grids, as the library's own dequantize does
    step = max(1, DEQUANT_CHUNK_BYTES // max(1, rows.shape[1]))
    for a in range(0, rows.shape[0], step):
        out[a:a + step] = cls.dequantize_rows(rows[a:a + step])
    return out.reshape(oshape)


@dataclass
class GGUFFile:
    """An opened GGUF: ``metadata`` (plain Python values) and ``tensors`` by name."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, Any]
    reader: Any = field(repr=False, default=None)

    @classmethod
    def open(cls, path: str) -> "GGUFFile":
        path = os.fspath(path)
        _check_header(path)
        import gguf

        from waferllm.models.gguf_reader import FastGGUFReader, fast_reader_supported, field_values

        try:
            reader = (FastGGUFReader if fast_reader_supported() else gguf.GGUFReader)(path, "r")
        except Exception as exc:  # struct/numpy/ValueError on a corrupt or truncated file
            raise ModelError(f"{path}: corrupt or truncated GGUF file ({type(exc).__name__}: {exc})") from None
        meta: dict[str, Any] = {}
        key = None
        try:
            for key, f in reader.fields.items():
                if key.startswith("GGUF."):
                    continue
                is_array = bool(f.types) and f.types[0] == gguf.GGUFValueType.ARRAY
                if is_array and len(f.data) > 4096 and key not in _KEEP_ARRAYS:
                    continue
                meta[key] = field_values(f)
        except Exception as exc:
            raise ModelError(f"{path}: corrupt GGUF metadata at key {key!r} ({type(exc).__name__}: {exc})") from None
        size = os.path.getsize(path)
        tensors = {}
        name = None
        try:
            for t in reader.tensors:
                name = t.name
                if int(t.data_offset) + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
                    raise ModelError(f"{path}: truncated GGUF file: tensor {t.name!r} extends past the end of the file")
                tensors[t.name] = t
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{path}: corrupt GGUF tensor info for {name!r} ({type(exc).__name__}: {exc})") from None
        return cls(path=path, metadata=meta, tensors=tensors, reader=reader)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Numpy (row-major) shape: GGUF's ``ne`` reversed, e.g. [out, in] for a matrix."""
        return tuple(int(x) for x in reversed(self.tensors[name].shape.tolist()))

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Dequantised float32 tensor in numpy order; checks presence, ``shape`` and that every value is finite."""
        t = self.tensors.get(name)
        if t is None:
            raise ModelError(f"{self.path}: missing tensor {name!r}")
        got = self.tensor_shape(name)
        if shape is not None and got != tuple(shape):
            raise ModelError(f"{self.path}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelError(f"{self.path}: tensor {name!r} uses quantisation {t.tensor_type.name}, which the gguf package cannot dequantise") from None
        except Exception as exc:
            raise ModelError(f"{self.path}: cannot decode tensor {name!r} ({type(exc).__name__}: {exc})") from None
        arr = np.asarray(arr, dtype=np.float32)
        if arr.size != int(np.prod(got)):
            raise ModelError(f"{self.path}: tensor {name!r} holds {arr.size} values, expected {int(np.prod(got))}")
        return check_finite(arr.reshape(got), self.path, name)


def check_rope_scaling(config: ModelConfig, where: str) -> ModelConfig:
    """Refuse rope scaling numbers the rotary embedding would divide by or turn into NaN."""
    rs = config.rope_scaling or {}
    nums = [(k, rs[k]) for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if k in rs] + [("freq_factors", f) for f in rs.get("freq_factors", [])]
    for key, v in nums:
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ModelError(f"{where}: rope scaling {key} must be a positive finite number, got {v!r}")
    if rs.get("rope_type") == "llama3" and rs["low_freq_factor"] == rs["high_freq_factor"]:
        raise ModelError(f"{where}: llama3 rope scaling needs low_freq_factor != high_freq_factor, got both "
                         f"{rs['low_freq_factor']!r}")
    return config


def gguf_config(gf: GGUFFile) -> ModelConfig:
    freq = None
    if "rope_freqs.weight" in gf.tensors:
        freq = gf.get("rope_freqs.weight").reshape(-1).tolist()
    name = os.path.basename(gf.path)
    try:
        return check_rope_scaling(ModelConfig.from_gguf_metadata(gf.metadata, name=name, tensor_names=set(gf.tensors),
                                                                 rope_freq_factors=freq), gf.path)
    except ModelError as exc:
        msg = str(exc)
        raise ModelError(msg if gf.path in msg else f"{gf.path}: {msg}") from None
    except Exception as exc:  # a metadata value of the wrong type (an edited or corrupt header)
        raise ModelError(f"{gf.path}: bad GGUF metadata for the model config ({type(exc).__name__}: {exc})") from None


def load_gguf_weights(gf: GGUFFile, config: ModelConfig, cache_layers: int | None = None) -> ModelWeights:
    """Build :class:`ModelWeights` (x @ W orientation, HF RoPE order) from an opened GGUF."""
    E, V = config.hidden_size, config.vocab_size
    permuted = gf.metadata.get("general.architecture") in _PERMUTED_ARCHS
    shapes = expected_layer_shapes(config)

    # Check every tensor's presence and shape up front, so errors surface at load time.
    def hf_shape(key: str) -> tuple[int, ...]:
        s = shapes[key]
        return s if len(s) == 1 else (s[1], s[0])  # GGUF stores [out, in]

    names = {
        "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
        "wo": "attn_output.weight", "ffn_norm": "ffn_norm.weight", "w_gate": "ffn_gate.weight",
        "w_up": "ffn_up.weight", "w_down": "ffn_down.weight", "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
    }
    for i in range(config.num_layers):
        for key in shapes:
            n = f"blk.{i}.{names[key]}"
            if n not in gf.tensors:
                raise ModelError(f"{gf.path}: missing tensor {n!r}")
            if gf.tensor_shape(n) != hf_shape(key):
                raise ModelError(f"{gf.path}: tensor {n!r} has shape {list(gf.tensor_shape(n))}, expected {list(hf_shape(key))}")

    def build(i: int) -> LayerWeights:
        p = f"blk.{i}."
        arrays: dict[str, np.ndarray] = {}
        for key in shapes:
            a = gf.get(p + names[key], hf_shape(key))
            if permuted and key in ("wq", "bq"):
                a = unpermute_qk(a, config.num_heads)
            elif permuted and key in ("wk", "bk"):
                a = unpermute_qk(a, config.num_kv_heads)
            arrays[key] = np.ascontiguousarray(a.T) if a.ndim == 2 else a
        return LayerWeights(**arrays)

    embed = gf.get("token_embd.weight", (V, E))
    final_norm = gf.get("output_norm.weight", (E,))
    if config.tie_word_embeddings:
        lm_head = embed.T
    else:
        lm_head = np.ascontiguousarray(gf.get("output.weight", (V, E)).T)
    return ModelWeights(config=config, embed=embed, layers=LazyLayers(config.num_layers, build, cache=cache_layers),
                        final_norm=final_norm, lm_head=lm_head)
