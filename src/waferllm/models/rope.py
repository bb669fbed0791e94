"""Rotary position embeddings, HF ("rotate_half" / NeoX) convention.

The head vector is split in two halves ``x = [x1, x2]``; position ``p`` rotates the pair
``(x1[i], x2[i])`` by angle ``p * inv_freq[i]``.
"""

from __future__ import annotations

import math

import numpy as np

from waferllm.models.config import ModelConfig


def rope_frequencies(config: ModelConfig) -> np.ndarray:
    """``inv_freq`` [head_dim/2] (float64) with the config's scaling applied."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D))
    rs = config.rope_scaling
    if not rs:
        return inv_freq
    kind = rs["rope_type"]
    if kind == "linear":
        return inv_freq / rs["factor"]
    if kind == "freq_factors":
        return inv_freq / np.asarray(rs["freq_factors"], dtype=np.float64)
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(medium, smoothed, scaled)
    raise ValueError(f"unknown rope type {kind!r}")  # unreachable: ModelConfig validates


def rope_cos_sin(config: ModelConfig, positions, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)``, each [T, head_dim], for integer ``positions`` [T]."""
    pos = np.asarray(positions, dtype=np.float64).reshape(-1)
    freqs = np.outer(pos, rope_frequencies(config))  # [T, D/2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [T, D]
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)


def rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate ``x`` [..., T, D] by ``cos``/``sin`` [T, D] (broadcast over leading dims)."""
    return x * cos + rotate_half(x) * sin
