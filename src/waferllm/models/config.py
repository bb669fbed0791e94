"""Model hyperparameters: one dataclass every layer agrees on.

A :class:`ModelConfig` describes a dense decoder-only transformer of the LLaMA family
(LLaMA 2/3, Mistral, CodeLlama, Qwen2, SmolLM2): RMSNorm, rotary position embeddings,
grouped-query attention, SwiGLU feed-forward. It can be built from an HF ``config.json``
dict (:meth:`ModelConfig.from_hf_dict`), from GGUF metadata
(:meth:`ModelConfig.from_gguf_metadata`) or from a preset (:mod:`waferllm.models.presets`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from waferllm.errors import ModelError

#: Architectures the reference forward (and the wafer engine) implement.
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")

#: HF ``model_type`` / ``architectures[0]`` -> our arch name.
_HF_ARCH = {
    "llama": "llama",
    "LlamaForCausalLM": "llama",
    "mistral": "mistral",
    "MistralForCausalLM": "mistral",
    "qwen2": "qwen2",
    "Qwen2ForCausalLM": "qwen2",
}

#: RoPE scaling types :mod:`waferllm.models.rope` implements.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


def _normalise_rope_scaling(rs: Mapping[str, Any] | None, where: str) -> dict | None:
    """Return ``None`` for plain RoPE, else a dict with a ``rope_type`` key."""
    if not rs:
        return None
    rs = dict(rs)
    rope_type = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("rope_theta", None)
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(f"{where}: unsupported rope scaling type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    out = {"rope_type": rope_type, **rs}
    if rope_type == "linear":
        if "factor" not in out:
            raise ModelError(f"{where}: linear rope scaling needs a 'factor'")
        out["factor"] = float(out["factor"])
    elif rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in out:
                raise ModelError(f"{where}: llama3 rope scaling needs {key!r}")
        out["factor"] = float(out["factor"])
        out["low_freq_factor"] = float(out["low_freq_factor"])
        out["high_freq_factor"] = float(out["high_freq_factor"])
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    elif rope_type == "freq_factors":
        if "freq_factors" not in out:
            raise ModelError(f"{where}: freq_factors rope scaling needs 'freq_factors'")
        out["freq_factors"] = [float(x) for x in out["freq_factors"]]
    return out


@dataclass
class ModelConfig:
    """Shape and numerics of a LLaMA-family decoder.

    ``head_dim`` of 0 means ``hidden_size // num_heads``.
    ``rope_scaling`` is ``None`` or a dict with ``rope_type`` in ``linear``/``llama3``/``freq_factors``.
    """

    name: str
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`ModelError` for an inconsistent configuration."""
        where = f"model config {self.name!r}"
        if self.arch not in SUPPORTED_ARCHS:
            raise ModelError(f"{where}: unsupported architecture {self.arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_position_embeddings"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ModelError(f"{where}: {key} must be a positive integer, got {v!r}")
        if not self.head_dim:
            if self.hidden_size % self.num_heads:
                raise ModelError(f"{where}: num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}")
            self.head_dim = self.hidden_size // self.num_heads
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ModelError(f"{where}: head_dim must be a positive even integer, got {self.head_dim!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(f"{where}: num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ModelError(f"{where}: rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ModelError(f"{where}: rope_theta must be positive, got {self.rope_theta!r}")
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling, where)
        if self.rope_scaling and self.rope_scaling["rope_type"] == "freq_factors":
            if len(self.rope_scaling["freq_factors"]) != self.head_dim // 2:
                raise ModelError(f"{where}: {len(self.rope_scaling['freq_factors'])} rope freq factors, expected head_dim/2={self.head_dim // 2}")
        self.eos_token_ids = [int(x) for x in (self.eos_token_ids or [])]
        for t in ([self.bos_token_id] if self.bos_token_id is not None else []) + self.eos_token_ids:
            if not 0 <= t < self.vocab_size:
                raise ModelError(f"{where}: special token id {t} outside the vocabulary (size {self.vocab_size})")

    # --------------------------------------------------------------- derived
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = MHA, num_heads = MQA)."""
        return self.num_heads // self.num_kv_heads

    def layer_param_count(self) -> int:
        E, F = self.hidden_size, self.intermediate_size
        n = E * self.q_dim + 2 * E * self.kv_dim + self.q_dim * E  # wq wk wv wo
        n += 3 * E * F  # gate up down
        n += 2 * E  # two norms
        if self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        return n

    def param_count(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        n = self.vocab_size * self.hidden_size
        if not self.tie_word_embeddings:
            n += self.vocab_size * self.hidden_size
        return n + self.num_layers * self.layer_param_count() + self.hidden_size

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return 2 * self.num_layers * self.kv_dim * bytes_per_value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------- constructors
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], name: str | None = None) -> "ModelConfig":
        """Build from an HF ``config.json`` dict (transformers 4.x or 5.x spelling)."""
        where = f"HF config {name or d.get('_name_or_path') or ''}".strip()
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        arch = _HF_ARCH.get(model_type) or next((_HF_ARCH[a] for a in archs if a in _HF_ARCH), None)
        if arch is None:
            raise ModelError(f"{where}: unsupported architecture (model_type={model_type!r}, architectures={archs!r}); supported: {', '.join(SUPPORTED_ARCHS)}")
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            rope_params = d.get("rope_parameters") or {}
            rope_theta = float(d.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
            rope_scaling = d.get("rope_scaling") or rope_params or None
            eos = d.get("eos_token_id")
            eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(x) for x in eos])
            qkv_bias = bool(d.get("attention_bias", arch == "qwen2"))
            if arch == "qwen2":
                qkv_bias = True  # Qwen2 always has q/k/v biases (and none on o_proj)
            tie = d.get("tie_word_embeddings")
            return cls(
                name=name or d.get("_name_or_path") or model_type or arch,
                arch=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or 0),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(tie) if tie is not None else False,
                qkv_bias=qkv_bias,
                bos_token_id=None if d.get("bos_token_id") is None else int(d["bos_token_id"]),
                eos_token_ids=eos_ids,
            )
        except KeyError as exc:
            raise ModelError(f"{where}: missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}: bad value ({exc})") from None

    @classmethod
    def from_gguf_metadata(
        cls,
        meta: Mapping[str, Any],
        name: str | None = None,
        tensor_names: set[str] | None = None,
        rope_freq_factors: list[float] | None = None,
    ) -> "ModelConfig":
        """Build from GGUF key/value metadata (plain Python values).

        ``tensor_names`` tells whether the file has an ``output.weight`` (untied head) and
        q/k/v biases; ``rope_freq_factors`` is the content of a ``rope_freqs.weight`` tensor
        (LLaMA-3.1 style scaling baked in by llama.cpp).
        """
        where = f"GGUF {name or ''}".strip()
        garch = meta.get("general.architecture")
        arch = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}.get(garch)
        if arch is None:
            raise ModelError(f"{where}: unsupported architecture {garch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

        def get(key: str, default: Any = KeyError) -> Any:
            full = f"{garch}.{key}"
            if full in meta:
                return meta[full]
            if default is KeyError:
                raise ModelError(f"{where}: missing metadata key {full!r}")
            return default

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        kv = get("attention.head_count_kv", heads)
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = get("vocab_size", None) or (len(tokens) if tokens is not None else None)
        if vocab is None:
            raise ModelError(f"{where}: cannot tell the vocabulary size (no {garch}.vocab_size and no tokenizer.ggml.tokens)")
        head_dim = int(get("attention.key_length", 0) or 0)  # 0 -> hidden_size // num_heads
        rope_scaling = None
        stype = get("rope.scaling.type", None)
        if rope_freq_factors is not None:
            rope_scaling = {"rope_type": "freq_factors", "freq_factors": list(rope_freq_factors)}
        elif stype and stype != "none":
            if stype != "linear":
                raise ModelError(f"{where}: unsupported rope scaling type {stype!r}")
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = [] if eos is None else [int(eos)]
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is not None and int(eot) not in eos_ids:
            eos_ids.append(int(eot))
        tn = tensor_names or set()
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return cls(
            name=name or str(meta.get("general.name") or garch),
            arch=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings=bool(tn) and "output.weight" not in tn,
            qkv_bias="blk.0.attn_q.bias" in tn,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
        )
