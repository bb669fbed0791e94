"""Tiny random models for tests: HF safetensors directories and GGUF files written from numpy.

``tiny_config()`` gives a small :class:`ModelConfig`; ``random_weights(config)`` random
:class:`ModelWeights`; ``write_hf_checkpoint`` / ``write_gguf`` save them in the two file
formats (GGUF with llama.cpp's Q/K permutation), so loaders and engines can be tested
without downloading anything.
"""

from __future__ import annotations

import json
import os

import numpy as np

from waferllm.models.config import ModelConfig
from waferllm.models.weights import LayerWeights, ModelWeights, expected_layer_shapes


def tiny_config(**overrides) -> ModelConfig:
    base = dict(name="tiny", arch="llama", vocab_size=272, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=256, tie_word_embeddings=False, qkv_bias=False, bos_token_id=256,
                eos_token_ids=[257])
    base.update(overrides)
    return ModelConfig(**base)


def random_weights(config: ModelConfig, seed: int = 0, scale: float = 0.08) -> ModelWeights:
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    layers = []
    for _ in range(config.num_layers):
        arrays = {}
        for key, shape in expected_layer_shapes(config).items():
            arrays[key] = (1.0 + r(*shape)).astype(np.float32) if key.endswith("norm") else r(*shape)
        layers.append(LayerWeights(**arrays))
    embed = r(config.vocab_size, config.hidden_size)
    lm_head = embed.T if config.tie_word_embeddings else r(config.hidden_size, config.vocab_size)
    return ModelWeights(config=config, embed=embed, layers=layers, final_norm=(1.0 + r(config.hidden_size)), lm_head=lm_head)


def hf_config_dict(config: ModelConfig) -> dict:
    d = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.arch]],
        "model_type": config.arch, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling,
        "max_position_embeddings": config.max_position_embeddings, "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids[0] if config.eos_token_ids else None,
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    if config.arch == "llama":
        d["attention_bias"] = config.qkv_bias
    return d


def hf_state_dict(weights: ModelWeights) -> dict[str, np.ndarray]:
    """HF tensor names and [out, in] orientation."""
    names = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
             "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
             "ffn_norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
             "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight", "bq": "self_attn.q_proj.bias",
             "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias"}
    sd = {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.final_norm}
    for i, layer in enumerate(weights.layers):
        for key, a in layer.arrays().items():
            sd[f"model.layers.{i}.{names[key]}"] = np.ascontiguousarray(a.T if a.ndim == 2 else a)
    if not weights.config.tie_word_embeddings:
        sd["lm_head.weight"] = np.ascontiguousarray(weights.lm_head.T)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def byte_tokenizer(vocab_size: int = 272):
    """A byte-level BPE ``tokenizers.Tokenizer`` over 256 byte symbols + special tokens (no merges)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    from waferllm.models.tokenizer import _bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode()[b] for b in range(256))}
    specials = ["<s>", "</s>"] + [f"<extra_{i}>" for i in range(vocab_size - 258)]
    for i, s in enumerate(specials):
        vocab[s] = 256 + i
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials[:2]])
    return tok


def write_hf_checkpoint(directory: str, weights: ModelWeights, max_shard_bytes: int | None = None) -> str:
    """Write config.json, tokenizer files and model.safetensors (sharded with an index when asked)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    cfg = weights.config
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg), f, indent=1)
    byte_tokenizer(cfg.vocab_size).save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    sd = hf_state_dict(weights)
    if not max_shard_bytes:
        save_file(sd, os.path.join(directory, "model.safetensors"))
        return directory
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        if cur and size + v.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, fn))
        weight_map.update({k: fn for k in shard})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return directory


def write_gguf(path: str, weights: ModelWeights, arch: str | None = None, skip: tuple[str, ...] = (),
               reshape: dict[str, tuple[int, ...]] | None = None, quant: str | None = None) -> str:
    """Write an F32 GGUF the way llama.cpp's converter lays it out (Q/K rows permuted for llama).

    ``skip`` leaves tensors out and ``reshape`` overrides shapes (numpy order) -- for corrupt-file tests.
    ``quant`` ("Q8_0", "Q4_0", ...): the layers' matrices are stored in that GGUF type, quantised
    by the ``gguf`` package (their rows must be whole blocks of 32).
    """
    import gguf

    from waferllm.models.gguf_loader import permute_qk

    cfg = weights.config
    arch = arch or ("qwen2" if cfg.arch == "qwen2" else "llama")
    w = gguf.GGUFWriter(path, arch)
    w.add_name(cfg.name)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    from waferllm.models.tokenizer import _bytes_to_unicode

    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["<s>", "</s>"] + [f"<extra_{i}>" for i in range(cfg.vocab_size - 258)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * (cfg.vocab_size - 256))
    w.add_token_merges([])
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_ids:
        w.add_eos_token_id(cfg.eos_token_ids[0])
    permuted = arch in ("llama", "mistral")
    names = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
             "wo": "attn_output.weight", "ffn_norm": "ffn_norm.weight", "w_gate": "ffn_gate.weight",
             "w_up": "ffn_up.weight", "w_down": "ffn_down.weight", "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}
    tensors = {"token_embd.weight": weights.embed, "output_norm.weight": weights.final_norm}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = weights.lm_head.T
    for i, layer in enumerate(weights.layers):
        for key, a in layer.arrays().items():
            t = a.T if a.ndim == 2 else a  # [out, in]
            if permuted and key in ("wq", "bq"):
                t = permute_qk(t, cfg.num_heads)
            elif permuted and key in ("wk", "bk"):
                t = permute_qk(t, cfg.num_kv_heads)
            tensors[f"blk.{i}.{names[key]}"] = t
    for name, t in tensors.items():
        if name in skip:
            continue
        t = np.ascontiguousarray(t, dtype=np.float32)
        if reshape and name in reshape:
            t = np.resize(t, reshape[name]).astype(np.float32)
        if quant and name.startswith("blk.") and t.ndim == 2:
            qtype = gguf.GGMLQuantizationType[quant]
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
            continue
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
