"""Block-quantised weights: GGUF's ``Q8_0`` and ``Q4_0`` layouts, in numpy.

A weight matrix ``W`` [K, N] (applied as ``x @ W``) is cut along its input dim K into
blocks of 32 consecutive values per column, each stored as 32 integers and one fp16
scale ``d`` (ggml's documented layouts; GGUF files store ``[N, K]`` rows, so their blocks
run along K as well):

- ``int8`` (``Q8_0``): ``q = round(x / d)`` with ``d = max|x| / 127``, ``q`` in [-127, 127];
- ``int4`` (``Q4_0``): ``d = m / -8`` where ``m`` is the block's value of largest
  magnitude, ``q = min(15, trunc(x / d + 8.5)) - 8`` in [-8, 7] (stored as a nibble q + 8).

The value is ``q * d`` in both. The quantisers reproduce ggml's reference ones bit for
bit (round half away from zero, the reciprocal of ``d`` multiplied in fp32), so that
quantising a model here and in llama.cpp gives the same blocks. A K that is not a
multiple of 32 ends in a short block.

On the wafer a PE stores the integers of its tile of ``W`` and the fp16 scale of every
block its tile's rows touch, per column (:func:`scale_slots`), and dequantises in its
SIMD unit (:class:`waferllm.mesh.tensor.QuantTensor`). ``--weights native`` keeps a GGUF
file's own Q8_0 / Q4_0 blocks (:func:`native_weights`, read from the file's bytes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from waferllm.errors import ModelError, RequestError
from waferllm.mesh.tensor import QBLOCK, QUANT_BITS, SCALE_BYTES, quant_tile_bytes

#: what ``--weights`` takes: dense weights in the run's dtype, int8 or int4 blocks, or the file's own
WEIGHT_CHOICES = ("fp16", "int8", "int4", "native")
#: the GGUF type of each format, and back
GGUF_TYPES = {"int8": "Q8_0", "int4": "Q4_0"}
FORMAT_OF_GGUF = {v: k for k, v in GGUF_TYPES.items()}
#: the layer matrices that are quantised (norms and biases stay dense)
MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def check_weights(weights: str) -> str:
    if weights not in WEIGHT_CHOICES:
        raise RequestError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    return weights


# ------------------------------------------------------------------ quantise / dequantise


def _blocks(w: np.ndarray) -> tuple[np.ndarray, int]:
    """[K, N] float32 -> (nb, 32, N) zero-padded blocks along K, and K."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ModelError(f"block quantisation needs a [K, N] matrix, got shape {w.shape}")
    k, n = w.shape
    nb = -(-k // QBLOCK)
    if nb * QBLOCK != k:
        w = np.concatenate([w, np.zeros((nb * QBLOCK - k, n), np.float32)])
    return w.reshape(nb, QBLOCK, n), k


def _roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def quantize_q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``W`` [K, N] -> (q int8 [K, N], d fp16 [ceil(K/32), N]) as ggml's reference Q8_0."""
    b, k = _blocks(w)
    d = np.abs(b).max(axis=1) / np.float32(127)  # (nb, N) fp32
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = _roundf(b * inv[:, None, :]).astype(np.int8)
    return q.reshape(-1, b.shape[2])[:k], d.astype(np.float16)


def quantize_q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``W`` [K, N] -> (q int8 in [-8, 7] [K, N], d fp16 [ceil(K/32), N]) as ggml's reference Q4_0."""
    b, k = _blocks(w)
    at = np.abs(b).argmax(axis=1)[:, None, :]  # the first value of largest magnitude
    m = np.take_along_axis(b, at, axis=1)[:, 0, :]
    d = (m / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.minimum(np.trunc(b * inv[:, None, :] + np.float32(8.5)), 15).astype(np.int8) - np.int8(8)
    return q.reshape(-1, b.shape[2])[:k], d.astype(np.float16)


QUANTIZERS = {"int8": quantize_q8_0, "int4": quantize_q4_0}


def expand_scales(d: np.ndarray, k: int) -> np.ndarray:
    """fp16 [ceil(K/32), N] block scales -> [K, N]: every value's own scale."""
    return np.repeat(np.asarray(d, np.float16), QBLOCK, axis=0)[:k]


@dataclass(frozen=True, eq=False)
class QuantMatrix:
    """A block-quantised [K, N] matrix: integers ``q`` (int8 array, [-8, 7] for int4) and the
    fp16 scale ``d`` of every block of 32 values along K, per column."""

    fmt: str
    q: np.ndarray
    d: np.ndarray

    def __post_init__(self):
        if self.fmt not in QUANT_BITS:
            raise ModelError(f"quantised format must be one of {', '.join(QUANT_BITS)}, got {self.fmt!r}")
        if self.q.ndim != 2 or self.d.shape != (-(-self.q.shape[0] // QBLOCK), self.q.shape[1]):
            raise ModelError(f"quantised matrix: {self.q.shape[0]}x{self.q.shape[1]} values need "
                             f"{-(-self.q.shape[0] // QBLOCK)}x{self.q.shape[1]} block scales, got {self.d.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        """Bytes as stored: the packed integers and the fp16 scales."""
        return math.ceil(self.q.size * QUANT_BITS[self.fmt] / 8) + self.d.size * SCALE_BYTES

    def scales(self) -> np.ndarray:
        """fp16 [K, N]: the scale of every value."""
        return expand_scales(self.d, self.q.shape[0])

    def dequantize(self) -> np.ndarray:
        """float32 [K, N]: ``q * d`` (exact in fp32)."""
        return self.q.astype(np.float32) * self.scales().astype(np.float32)


def quantize(w, fmt: str) -> QuantMatrix:
    """``W`` [K, N] (a float array, or a QuantMatrix of the same format, kept) in ``fmt``."""
    if isinstance(w, QuantMatrix):
        if w.fmt != fmt:
            raise ModelError(f"weights are already quantised as {w.fmt} ({GGUF_TYPES[w.fmt]}); cannot run them as {fmt}")
        return w
    if fmt not in QUANTIZERS:
        raise ModelError(f"quantised format must be one of {', '.join(QUANTIZERS)}, got {fmt!r}")
    return QuantMatrix(fmt, *QUANTIZERS[fmt](w))


def dequantize(w) -> np.ndarray:
    """A QuantMatrix's float32 values (a float array passes through)."""
    return w.dequantize() if isinstance(w, QuantMatrix) else w


# ------------------------------------------------------------------ whole models


def _map_layers(weights, fn, embed=None, lm_head=None):
    from waferllm.models.weights import LazyLayers, ModelWeights

    layers = weights.layers
    return ModelWeights(config=weights.config, embed=weights.embed if embed is None else embed,
                        layers=LazyLayers(len(layers), lambda i: fn(layers[i]), cache=None),
                        final_norm=weights.final_norm, lm_head=weights.lm_head if lm_head is None else lm_head)


def quantize_layer(layer, fmt: str):
    """A LayerWeights with its matrices in ``fmt`` (norms and biases unchanged)."""
    return dataclasses.replace(layer, **{k: quantize(getattr(layer, k), fmt) for k in MATRICES})


def dequantize_layer(layer):
    """A LayerWeights with float32 matrices: quantised ones dequantised."""
    return dataclasses.replace(layer, **{k: dequantize(getattr(layer, k)) for k in MATRICES})


def quantize_weights(weights, fmt: str):
    """:class:`ModelWeights` whose layer matrices are ``fmt`` blocks (built layer by layer on
    first use). The embedding, LM head and norms stay as they are."""
    if fmt not in QUANTIZERS:
        raise ModelError(f"quantised format must be one of {', '.join(QUANTIZERS)}, got {fmt!r}")
    return _map_layers(weights, lambda lw: quantize_layer(lw, fmt))


def dequantized_weights(weights):
    """The dense weights a quantised model computes with: every matrix ``q * d`` in float32
    (what the dense reference runs on to check a quantised wafer run)."""
    return _map_layers(weights, dequantize_layer)


def weights_format(weights) -> str | None:
    """``int8``/``int4`` when the layers' matrices are quantised (first layer), else None."""
    if weights is None or not len(weights.layers):
        return None
    wq = weights.layers[0].wq
    return wq.fmt if isinstance(wq, QuantMatrix) else None


# ------------------------------------------------------------------ a GGUF file's own blocks

_GGUF_NAMES = {"wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight", "wo": "attn_output.weight",
               "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight"}


def gguf_layer_types(gf, config) -> dict[str, int]:
    """GGUF type name -> how many of the layers' matrices use it."""
    out: dict[str, int] = {}
    for i in range(config.num_layers):
        for key in MATRICES:
            t = gf.tensors.get(f"blk.{i}.{_GGUF_NAMES[key]}")
            if t is not None:
                name = t.tensor_type.name
                out[name] = out.get(name, 0) + 1
    return out


def native_format(model) -> str:
    """The format ``--weights native`` runs ``model`` (a LoadedModel or a GGUF path) in: int8
    when every layer matrix of the file is Q8_0, int4 when every one is Q4_0; anything else
    is refused, saying what the file holds."""
    return _native_format(*_open_gguf(model))


def _native_format(gf, config, where) -> str:
    types = gguf_layer_types(gf, config)
    if len(types) == 1 and next(iter(types)) in FORMAT_OF_GGUF:
        return FORMAT_OF_GGUF[next(iter(types))]
    held = ", ".join(f"{n} {t}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]))
    raise RequestError(f"--weights native keeps a GGUF file's own Q8_0 or Q4_0 blocks, but the layer matrices of "
                       f"{where} are {held or 'absent'}: use --weights int8 or int4 to quantise them "
                       "(from their dequantised values), or fp16", weights="native", file=where, types=types)


def _open_gguf(model):
    import os

    from waferllm.models.gguf_loader import GGUFFile, gguf_config

    loaded = hasattr(model, "weights")  # a LoadedModel, or a path
    path = model.path if loaded else model
    fmt = model.format if loaded else (
        "gguf" if isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(".gguf") else "hf")
    if not isinstance(path, (str, os.PathLike)) or fmt != "gguf" or not os.path.isfile(path):
        raise RequestError(f"--weights native keeps a GGUF file's own quantisation; {path!s} is not a GGUF file "
                           "(presets and Hugging Face folders hold no quantised blocks): use --weights int8 or "
                           "int4, or fp16", weights="native")
    gf = GGUFFile.open(os.fspath(path))
    config = model.config if loaded else gguf_config(gf)
    return gf, config, os.fspath(path)


def _read_blocks(gf, name: str, shape_nk: tuple[int, int], fmt: str) -> QuantMatrix:
    """The raw blocks of GGUF tensor ``name`` ([N rows of K]) as a [K, N] QuantMatrix."""
    t = gf.tensors[name]
    n, k = shape_nk
    if k % QBLOCK:
        raise ModelError(f"{gf.path}: tensor {name!r} has rows of {k} values, not whole blocks of {QBLOCK}")
    per_block = 2 + QBLOCK * QUANT_BITS[fmt] // 8
    raw = np.asarray(t.data).view(np.uint8).reshape(n, k // QBLOCK, per_block)
    d = np.ascontiguousarray(raw[:, :, :2]).view(np.float16)[:, :, 0]  # (N, nb)
    body = raw[:, :, 2:]
    if fmt == "int8":
        q = np.ascontiguousarray(body).view(np.int8)  # (N, nb, 32)
    else:  # low nibbles hold values 0..15 of the block, high nibbles 16..31
        q = np.concatenate([body & 0x0F, body >> 4], axis=2).astype(np.int8) - np.int8(8)
    q = q.reshape(n, k)
    if not np.isfinite(d).all():
        raise ModelError(f"{gf.path}: tensor {name!r} has non-finite block scales: the file is corrupt")
    return QuantMatrix(fmt, np.ascontiguousarray(q.T), np.ascontiguousarray(d.T))


def _unpermute_cols(m: QuantMatrix, n_head: int) -> QuantMatrix:
    """llama.cpp's Q/K row permutation undone on a [K, N] matrix's columns (its blocks run
    along K, so they move whole)."""
    from waferllm.models.gguf_loader import unpermute_qk

    return QuantMatrix(m.fmt, np.ascontiguousarray(unpermute_qk(m.q.T, n_head).T),
                       np.ascontiguousarray(unpermute_qk(m.d.T, n_head).T))


def native_weights(model):
    """``model``'s weights (a LoadedModel from a GGUF file) with its layer matrices as the
    file's own Q8_0 / Q4_0 blocks, read from its bytes (see :func:`native_format`)."""
    from waferllm.models.gguf_loader import _PERMUTED_ARCHS
    from waferllm.models.weights import expected_layer_shapes

    gf, config, where = _open_gguf(model)  # opened once (format check and blocks)
    fmt = _native_format(gf, config, where)
    permuted = gf.metadata.get("general.architecture") in _PERMUTED_ARCHS
    shapes = expected_layer_shapes(config)
    base = model.weights

    def layer(lw, i):
        mats = {}
        for key in MATRICES:
            k, n = shapes[key]
            m = _read_blocks(gf, f"blk.{i}.{_GGUF_NAMES[key]}", (n, k), fmt)
            if permuted and key == "wq":
                m = _unpermute_cols(m, config.num_heads)
            elif permuted and key == "wk":
                m = _unpermute_cols(m, config.num_kv_heads)
            mats[key] = m
        return dataclasses.replace(lw, **mats)

    from waferllm.models.weights import LazyLayers, ModelWeights

    layers = base.layers
    return ModelWeights(config=base.config, embed=base.embed,
                        layers=LazyLayers(len(layers), lambda i: layer(layers[i], i), cache=None),
                        final_norm=base.final_norm, lm_head=base.lm_head)


def resolve_weights(weights: str, model=None) -> str:
    """The format a run stores its layer matrices in: ``fp16`` (dense, in the run's dtype),
    ``int8`` or ``int4``; ``native`` is the GGUF file's own (see :func:`native_format`)."""
    check_weights(weights)
    return native_format(model) if weights == "native" else weights


def weights_for_run(model, fmt: str, dtype: str = "fp32"):
    """The host weights a numeric run in ``fmt`` places: the model's own (dense; with
    ``dtype`` fp16 their matrices rounded to fp16 once, as every tile holding them is, for
    both phases' placements), the GGUF file's blocks (its native format) or its weights
    quantised here."""
    if fmt == "fp16":
        if dtype != "fp16":
            return model.weights
        # the vocabulary tables too: every region's slice of them (both phases') is cut from these
        w = model.weights
        embed = np.asarray(w.embed, np.float16)
        lm_head = embed.T if w.config.tie_word_embeddings else np.asarray(w.lm_head, np.float16)
        return _map_layers(w, lambda lw: dataclasses.replace(
            lw, **{k: np.asarray(getattr(lw, k), np.float16) for k in MATRICES}), embed, lm_head)
    try:
        if getattr(model, "format", None) == "gguf" and native_format(model) == fmt:
            return native_weights(model)
    except RequestError:
        pass
    return quantize_weights(model.weights, fmt)


# ------------------------------------------------------------------ what a PE stores


def scale_slots(rows: np.ndarray, tile_rows: int) -> int:
    """Most block scales one column of a tile needs: the distinct blocks (K index // 32) among
    the rows of any tile, ``rows`` being the K index of every placed row in order (-1: a
    padding row, which needs none), cut into tiles of ``tile_rows``."""
    rows = np.asarray(rows, np.int64)
    parts = -(-rows.size // tile_rows) if tile_rows else 0
    if parts == 0:
        return 0
    pad = np.full(parts * tile_rows, -1, np.int64)
    pad[: rows.size] = rows
    blocks = np.where(pad >= 0, pad // QBLOCK, -1).reshape(parts, tile_rows)
    blocks = np.sort(blocks, axis=1)
    new = np.ones(blocks.shape, bool)
    new[:, 1:] = blocks[:, 1:] != blocks[:, :-1]
    return int((new & (blocks >= 0)).sum(axis=1).max())


def tile_bytes(fmt: str, tile_rows: int, tile_cols: int, slots: int) -> int:
    """Bytes a PE stores for a tile: its packed integers and ``slots`` fp16 scales per column."""
    return quant_tile_bytes(fmt, tile_rows * tile_cols, tile_cols, slots)
