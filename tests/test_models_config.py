"""ModelConfig validation, presets, RoPE."""

import numpy as np
import pytest

from waferllm.errors import ModelError
from waferllm.models.config import ModelConfig
from waferllm.models.presets import get_model_preset, list_model_presets
from waferllm.models.rope import apply_rope, rope_cos_sin, rope_frequencies
from waferllm.models.testing import tiny_config

PUBLISHED = {  # parameter counts of the real checkpoints
    "llama3-8b": 8.03e9, "llama2-13b": 13.0e9, "codellama-34b": 33.7e9, "qwen2-72b": 72.7e9,
    "llama3-70b": 70.6e9, "smollm2-135m": 134.5e6,
}


def test_presets_param_counts():
    assert set(PUBLISHED) <= set(list_model_presets())
    for name, n in PUBLISHED.items():
        c = get_model_preset(name)
        assert abs(c.param_count() - n) / n < 0.01, name
    assert get_model_preset("qwen2-72b").qkv_bias
    assert get_model_preset("llama3-8b").group_size == 4
    with pytest.raises(ModelError, match="unknown model preset"):
        get_model_preset("gpt-5")


def test_preset_matches_embedded_model(smollm):
    p = get_model_preset("smollm2-135m")
    c = smollm.config
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_ids", "max_position_embeddings"):
        assert getattr(p, k) == getattr(c, k), k


@pytest.mark.parametrize("bad,match", [
    (dict(num_heads=5, head_dim=0), "does not divide hidden_size"),
    (dict(num_kv_heads=3), "num_kv_heads=3 does not divide num_heads=4"),
    (dict(head_dim=15), "head_dim"),
    (dict(arch="gpt2"), "unsupported architecture"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported rope scaling"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "llama3 rope scaling needs"),
    (dict(eos_token_ids=[10_000]), "outside the vocabulary"),
])
def test_config_validation(bad, match):
    with pytest.raises(ModelError, match=match):
        tiny_config(**bad)


def test_from_hf_dict_both_spellings():
    base = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, eos_token_id=[1, 2], bos_token_id=0)
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    a = ModelConfig.from_hf_dict(dict(base, rope_theta=500000.0, rope_scaling=rs))
    b = ModelConfig.from_hf_dict(dict(base, rope_parameters=dict(rs, rope_theta=500000.0)))
    assert a == b and a.rope_theta == 500000.0 and a.eos_token_ids == [1, 2] and a.head_dim == 16
    c = ModelConfig.from_hf_dict(dict(base, rope_scaling={"type": "linear", "factor": 2.0}))
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ModelError, match="missing key 'hidden_size'"):
        ModelConfig.from_hf_dict({k: v for k, v in base.items() if k != "hidden_size"})


def test_rope_matches_transformers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for rs in (None, {"rope_type": "linear", "factor": 4.0},
               {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}):
        hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500000.0, max_position_embeddings=4096,
                             rope_scaling=rs)
        ours = tiny_config(hidden_size=256, num_heads=2, num_kv_heads=2, head_dim=128, rope_theta=500000.0,
                           max_position_embeddings=4096, rope_scaling=rs)
        emb = LlamaRotaryEmbedding(hf_cfg)
        np.testing.assert_allclose(rope_frequencies(ours), emb.inv_freq.numpy(), rtol=1e-6)
        pos = np.arange(0, 4000, 37)
        cos, sin = rope_cos_sin(ours, pos)
        hc, hs = emb(torch.zeros(1), torch.tensor(pos)[None])
        np.testing.assert_allclose(cos, hc[0].numpy(), atol=2e-3)
        np.testing.assert_allclose(sin, hs[0].numpy(), atol=2e-3)


def test_apply_rope_is_rotation():
    c = tiny_config()
    x = np.random.default_rng(0).standard_normal((3, 5, c.head_dim)).astype(np.float32)
    cos, sin = rope_cos_sin(c, np.arange(5))
    y = apply_rope(x, cos, sin)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)  # position 0 is the identity
    # relative: <rope(q, m), rope(k, n)> depends on m - n only
    q, k = x[0, 0], x[1, 0]
    def dot(m, n):
        cm, sm = rope_cos_sin(c, [m]); cn, sn = rope_cos_sin(c, [n])
        return float(apply_rope(q[None], cm, sm)[0] @ apply_rope(k[None], cn, sn)[0])
    assert abs(dot(7, 3) - dot(14, 10)) < 1e-4
