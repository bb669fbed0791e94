"""Shape-only model presets with the published hyperparameters (no weights).

Used to plan placements and predict wafer performance for models too large to run
numerically here. Sources: each model's ``config.json`` on the Hugging Face Hub.
"""

from __future__ import annotations

from waferllm.errors import ModelError
from waferllm.models.config import ModelConfig

_PRESETS: dict[str, dict] = {
    # meta-llama/Meta-Llama-3-8B(-Instruct)
    "llama3-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
                      eos_token_ids=[128001, 128009]),
    # meta-llama/Llama-2-13b-hf
    "llama2-13b": dict(arch="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                       num_heads=40, num_kv_heads=40, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=[2]),
    # codellama/CodeLlama-34b-hf
    "codellama-34b": dict(arch="llama", vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_layers=48,
                          num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0,
                          max_position_embeddings=16384, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=[2]),
    # Qwen/Qwen2-72B(-Instruct)
    "qwen2-72b": dict(arch="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80,
                      num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                      max_position_embeddings=32768, tie_word_embeddings=False, qkv_bias=True,
                      bos_token_id=151643, eos_token_ids=[151643, 151645]),
    # meta-llama/Meta-Llama-3-70B(-Instruct)
    "llama3-70b": dict(arch="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                       num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
                       eos_token_ids=[128001, 128009]),
    # meta-llama/Llama-3.2-1B(-Instruct): llama3-8b's tokenizer, a 1B-class draft for it (its
    # rope_scaling for long contexts does not change a shape-only run)
    "llama3.2-1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                        max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000,
                        eos_token_ids=[128001, 128008, 128009]),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the embedded default model)
    "smollm2-135m": dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=[2]),
}

_ALIASES = {"llama-3-8b": "llama3-8b", "llama-2-13b": "llama2-13b", "llama-3-70b": "llama3-70b",
            "smollm2": "smollm2-135m", "llama-3.2-1b": "llama3.2-1b", "codellama34b": "codellama-34b"}


def list_model_presets() -> list[str]:
    return list(_PRESETS)


def get_model_preset(name: str) -> ModelConfig:
    """A fresh :class:`ModelConfig` for a preset name (case-insensitive)."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _PRESETS:
        raise ModelError(f"unknown model preset {name!r}; presets: {', '.join(_PRESETS)}")
    d = dict(_PRESETS[key])
    d["eos_token_ids"] = list(d["eos_token_ids"])
    return ModelConfig(name=key, **d)
