"""Loaders: tiny random checkpoints against transformers, GGUF permutation, corrupt files."""

import json
import os
import struct

import numpy as np
import pytest

from waferllm.errors import ModelError
from waferllm.models.loader import load_model
from waferllm.models.reference import ReferenceModel
from waferllm.models.testing import byte_tokenizer, random_weights, tiny_config, write_gguf, write_hf_checkpoint


def _hf_tiny(tmp_path, kind, dtype="float32", shard=False):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=272, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=256, bos_token_id=256, eos_token_id=257)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, **common)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.LlamaConfig(num_key_value_heads=1, head_dim=16, tie_word_embeddings=False, rope_theta=10000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                                       **common)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: randomise them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
            elif "embed" in name or "lm_head" in name:
                p.mul_(20)  # make logits large enough to compare meaningfully
    d = tmp_path / kind
    model.to(getattr(torch, dtype)).save_pretrained(str(d), safe_serialization=True, max_shard_size="60KB" if shard else "5GB")
    byte_tokenizer(272).save(str(d / "tokenizer.json"))
    ref = cls.from_pretrained(str(d), dtype=torch.float32).eval()
    return d, ref


@pytest.mark.parametrize("kind,dtype,shard", [("qwen2", "float32", False), ("llama3", "float32", True), ("llama3", "bfloat16", False)])
def test_tiny_hf_checkpoint_matches_transformers(tmp_path, kind, dtype, shard):
    torch = pytest.importorskip("torch")
    d, ref = _hf_tiny(tmp_path, kind, dtype, shard)
    if shard:
        assert (d / "model.safetensors.index.json").exists()
    m = load_model(str(d))
    assert m.config.arch == ("qwen2" if kind == "qwen2" else "llama")
    assert m.config.qkv_bias == (kind == "qwen2")
    assert m.config.tie_word_embeddings == (kind == "qwen2")
    if kind == "llama3":
        assert m.config.rope_scaling["rope_type"] == "llama3" and m.config.num_kv_heads == 1
    ids = list(np.random.default_rng(1).integers(0, 256, size=70))
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    rm = ReferenceModel(m.weights)
    got_prefill = rm.prefill(ids[:60])
    got_decode = [rm.decode(t) for t in ids[60:]]
    scale = np.abs(want).max()
    assert scale > 1.0
    np.testing.assert_allclose(got_prefill, want[:60], atol=2e-4 * scale, rtol=0)
    np.testing.assert_allclose(np.stack(got_decode), want[60:], atol=2e-4 * scale, rtol=0)
    # positions beyond original_max_position_embeddings exercise the llama3 rope scaling
    assert np.abs(got_prefill - want[:60]).max() < 1e-3 * scale


def test_gguf_llama_permutation_roundtrip(tmp_path):
    """A GGUF written with llama.cpp's Q/K permutation loads back to the same forward."""
    cfg = tiny_config(num_layers=2)
    w = random_weights(cfg, seed=3)
    path = write_gguf(str(tmp_path / "tiny.gguf"), w)
    m = load_model(path)
    assert m.config.num_kv_heads == 2 and m.config.head_dim == 16 and not m.config.tie_word_embeddings
    for a, b in zip(m.weights.layers, w.layers):
        for k, v in b.arrays().items():
            np.testing.assert_array_equal(getattr(a, k), v, err_msg=k)
    ids = [1, 5, 77, 200, 3, 9]
    np.testing.assert_allclose(ReferenceModel(m.weights).prefill(ids), ReferenceModel(w).prefill(ids), atol=1e-5)
    assert m.tokenizer.encode("hi") == [ord("h"), ord("i")]


def test_gguf_qwen2_bias_and_tied(tmp_path):
    cfg = tiny_config(arch="qwen2", qkv_bias=True, tie_word_embeddings=True)
    w = random_weights(cfg, seed=4)
    m = load_model(write_gguf(str(tmp_path / "q.gguf"), w))
    assert m.config.arch == "qwen2" and m.config.qkv_bias and m.config.tie_word_embeddings
    assert np.shares_memory(m.weights.lm_head, m.weights.embed)
    np.testing.assert_array_equal(m.weights.layers[1].bq, w.layers[1].bq)
    np.testing.assert_array_equal(m.weights.layers[1].wk, w.layers[1].wk)


def test_hf_checkpoint_roundtrip_sharded(tmp_path):
    cfg = tiny_config(arch="qwen2", qkv_bias=True)
    w = random_weights(cfg, seed=5)
    d = write_hf_checkpoint(str(tmp_path / "hf"), w, max_shard_bytes=40_000)
    m = load_model(d)
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 1
    ids = [256, 3, 4, 5]
    np.testing.assert_allclose(ReferenceModel(m.weights).prefill(ids), ReferenceModel(w).prefill(ids), atol=1e-5)
    assert m.tokenizer.bos_token_id == 256 and m.tokenizer.eos_token_ids == [257]


# ----------------------------------------------------------------------------- corrupt files
def _gguf(tmp_path, **kw):
    return write_gguf(str(tmp_path / "m.gguf"), random_weights(tiny_config(), seed=0), **kw)


def _expect(path, match):
    with pytest.raises(ModelError, match=match) as ei:
        load_model(path)
    assert os.path.basename(str(path)) in str(ei.value)
    return ei.value


def test_gguf_missing_file(tmp_path):
    _expect(str(tmp_path / "nope.gguf"), "not found")


def test_gguf_wrong_magic(tmp_path):
    p = tmp_path / "bad.gguf"
    data = bytearray(open(_gguf(tmp_path), "rb").read())
    data[:4] = b"GGML"
    p.write_bytes(bytes(data))
    _expect(str(p), "magic")


def test_gguf_truncated_header(tmp_path):
    src = open(_gguf(tmp_path), "rb").read()
    for n in (2, 10, 30, 200, 2000):
        p = tmp_path / f"trunc{n}.gguf"
        p.write_bytes(src[:n])
        _expect(str(p), "GGUF|magic|truncated|corrupt")


def test_gguf_truncated_tensor_data(tmp_path):
    src = open(_gguf(tmp_path), "rb").read()
    p = tmp_path / "short.gguf"
    p.write_bytes(src[: len(src) - 1000])
    _expect(str(p), "truncated|corrupt")


def test_gguf_missing_tensor(tmp_path):
    _expect(_gguf(tmp_path, skip=("blk.1.ffn_up.weight",)), "missing tensor 'blk.1.ffn_up.weight'")
    _expect(write_gguf(str(tmp_path / "m2.gguf"), random_weights(tiny_config()), skip=("output_norm.weight",)),
            "missing tensor 'output_norm.weight'")


def test_gguf_misshaped_tensor(tmp_path):
    _expect(_gguf(tmp_path, reshape={"blk.0.attn_q.weight": (64, 48)}), "blk.0.attn_q.weight.*shape")


def test_gguf_unsupported_arch(tmp_path):
    _expect(_gguf(tmp_path, arch="falcon"), "unsupported architecture 'falcon'")


def _hf_dir(tmp_path):
    return write_hf_checkpoint(str(tmp_path / "hf"), random_weights(tiny_config(), seed=0))


def test_safetensors_corrupt_header(tmp_path):
    d = _hf_dir(tmp_path)
    f = os.path.join(d, "model.safetensors")
    data = open(f, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    open(f, "wb").write(struct.pack("<Q", 10**12) + data[8:])
    _expect(d, "model.safetensors.*header")
    open(f, "wb").write(data[:8] + b"{not json" + data[17:])
    _expect(d, "model.safetensors.*corrupt safetensors header")
    open(f, "wb").write(data[:5])
    _expect(d, "model.safetensors.*truncated")
    open(f, "wb").write(data[: 8 + n + 100])
    _expect(d, "model.safetensors.*(truncated|does not fit)")


def test_safetensors_missing_and_misshaped(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _hf_dir(tmp_path)
    f = os.path.join(d, "model.safetensors")
    sd = load_file(f)
    full = dict(sd)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f)
    _expect(d, "missing tensor 'model.layers.1.mlp.up_proj.weight'")
    full["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(full, f)
    _expect(d, "model.safetensors.*k_proj.weight.*shape")


def test_hf_unsupported_arch_and_bad_config(tmp_path):
    d = _hf_dir(tmp_path)
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump(dict(cfg, model_type="gpt2", architectures=["GPT2LMHeadModel"]), open(cfg_path, "w"))
    _expect(d, "config.json.*unsupported architecture")
    json.dump(dict(cfg, num_key_value_heads=3), open(cfg_path, "w"))
    _expect(d, "config.json.*num_kv_heads=3 does not divide num_heads=4")
    open(cfg_path, "w").write("{broken")
    _expect(d, "config.json.*corrupt JSON")
    os.remove(cfg_path)
    _expect(d, "config.json.*not found")


def test_default_model_path():
    from waferllm.models.loader import default_model_path

    p = default_model_path()
    assert p.endswith(".gguf") and os.path.isfile(p)
