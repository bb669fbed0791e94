"""Layer 4: model configs, presets, GGUF/safetensors loaders, tokenizers, chat templates,
and the dense numpy reference forward."""

from waferllm.models.config import ModelConfig
from waferllm.models.presets import get_model_preset, list_model_presets

__all__ = ["ModelConfig", "get_model_preset", "list_model_presets"]
