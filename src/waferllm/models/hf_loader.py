"""HF checkpoint directories: ``config.json`` + ``*.safetensors`` (optionally sharded).

Safetensors files are parsed here (8-byte little-endian header length, JSON header, raw
data) and memory-mapped, so corrupt headers give a clear :class:`ModelError` and BF16
weights work without torch.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
from typing import Any

import numpy as np

from waferllm.errors import ModelError
from waferllm.models.config import ModelConfig
from waferllm.models.weights import LayerWeights, LazyLayers, ModelWeights, expected_layer_shapes

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One memory-mapped ``.safetensors`` file."""

    def __init__(self, path: str):
        self.path = path
        try:
            if not os.path.isfile(path):
                raise ModelError(f"{path}: safetensors file not found")
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ModelError(f"{path}: corrupt safetensors file: truncated header ({size} bytes)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise ModelError(f"{path}: corrupt safetensors header: header length {n} exceeds the file size {size}")
                raw = f.read(n)
        except OSError as exc:
            raise ModelError(f"{path}: cannot read the safetensors file ({exc.strerror or exc})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ModelError(f"{path}: corrupt safetensors header ({type(exc).__name__}: {exc})") from None
        meta = header.pop("__metadata__", None)
        self.metadata = meta if isinstance(meta, dict) else {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
                if not isinstance(dtype, str) or not isinstance(shape, list):
                    raise TypeError("dtype must be a string and shape a list")
                if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (*shape, start, end)):
                    raise ValueError("shape and data_offsets must be non-negative integers")
                shape = tuple(shape)
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelError(f"{path}: corrupt safetensors header entry for {name!r} ({exc})") from None
            if dtype not in _DTYPES:
                raise ModelError(f"{path}: tensor {name!r} has unsupported dtype {dtype} "
                                 f"(supported: {', '.join(_DTYPES)})")
            nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
            if not (0 <= start <= end <= data_len) or end - start != nbytes:
                raise ModelError(f"{path}: corrupt or truncated safetensors file: tensor {name!r} data [{start}, {end}) "
                                 f"does not fit ({nbytes} bytes expected, {data_len} data bytes in file)")
            self.entries[name] = (dtype, shape, int(start), int(end))
        try:
            self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else None
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: cannot map the safetensors file ({exc})") from None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (copy-free view for F32 data); every value must be finite."""
        dtype, shape, start, end = self.entries[name]
        try:
            raw = self._mm[self._data_start + start: self._data_start + end]
            if dtype == "BF16":
                arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                arr = raw.view(_DTYPES[dtype])
            arr = arr.reshape(shape).astype(np.float32, copy=False)
        except (TypeError, ValueError) as exc:  # the file changed since it was opened
            raise ModelError(f"{self.path}: cannot read tensor {name!r} ({exc})") from None
        from waferllm.models.gguf_loader import check_finite

        return check_finite(arr, self.path, name)


class HFCheckpoint:
    """Tensors of an HF directory, across shards."""

    def __init__(self, directory: str):
        self.dir = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        files: list[str]
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
                    raise TypeError("weight_map must map tensor names to file names")
            except (ValueError, KeyError, TypeError, RecursionError, OSError) as exc:
                raise ModelError(f"{index}: corrupt safetensors index ({type(exc).__name__}: {exc})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))
        if not files:
            raise ModelError(f"{directory}: no *.safetensors weights found")
        self.files = {fn: SafetensorsFile(os.path.join(directory, fn)) for fn in files}
        self.where: dict[str, str] = {}
        for fn, sf in self.files.items():
            for k in sf.keys():
                self.where[k] = fn

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.where:
            raise ModelError(f"{self.dir}: missing tensor {name!r}")
        sf = self.files[self.where[name]]
        if sf.shape(name) != tuple(shape):
            raise ModelError(f"{sf.path}: tensor {name!r} has shape {list(sf.shape(name))}, expected {list(shape)}")
        return sf.get(name)

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.where:
            raise ModelError(f"{self.dir}: missing tensor {name!r}")
        sf = self.files[self.where[name]]
        if sf.shape(name) != tuple(shape):
            raise ModelError(f"{sf.path}: tensor {name!r} has shape {list(sf.shape(name))}, expected {list(shape)}")


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{path}: file not found") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ModelError(f"{path}: corrupt JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(d, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return d


def hf_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    d = read_json(path)
    from waferllm.models.gguf_loader import check_rope_scaling

    try:
        return check_rope_scaling(ModelConfig.from_hf_dict(d, name=os.path.basename(os.path.normpath(directory))), path)
    except ModelError as exc:
        msg = str(exc)
        raise ModelError(msg if msg.startswith(path) else f"{path}: {msg}") from None
    except Exception as exc:  # a value of the wrong type in an edited or corrupt config
        raise ModelError(f"{path}: bad config value ({type(exc).__name__}: {exc})") from None


_HF_NAMES = {
    "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight", "ffn_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
    "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
}


def load_hf_weights(ck: HFCheckpoint, config: ModelConfig, cache_layers: int | None = None) -> ModelWeights:
    E, V = config.hidden_size, config.vocab_size
    prefix = "model." if ck.has("model.embed_tokens.weight") or not ck.has("embed_tokens.weight") else ""
    shapes = expected_layer_shapes(config)

    def torch_shape(key: str) -> tuple[int, ...]:
        s = shapes[key]
        return s if len(s) == 1 else (s[1], s[0])  # nn.Linear weight is [out, in]

    for i in range(config.num_layers):
        for key in shapes:
            ck.check(f"{prefix}layers.{i}.{_HF_NAMES[key]}", torch_shape(key))

    def build(i: int) -> LayerWeights:
        arrays = {}
        for key in shapes:
            a = ck.get(f"{prefix}layers.{i}.{_HF_NAMES[key]}", torch_shape(key))
            arrays[key] = np.ascontiguousarray(a.T) if a.ndim == 2 else np.array(a)
        return LayerWeights(**arrays)

    embed = np.array(ck.get(f"{prefix}embed_tokens.weight", (V, E)))
    final_norm = np.array(ck.get(f"{prefix}norm.weight", (E,)))
    if config.tie_word_embeddings:
        lm_head = embed.T
    else:
        lm_head = np.ascontiguousarray(ck.get("lm_head.weight", (V, E)).T)
    return ModelWeights(config=config, embed=embed, layers=LazyLayers(config.num_layers, build, cache=cache_layers),
                        final_norm=final_norm, lm_head=lm_head)
