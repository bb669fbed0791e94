"""The numpy reference forward of the embedded SmolLM2 against HF transformers (same GGUF)."""

import os

import numpy as np
import pytest

from waferllm.engine.sampling import SamplingParams
from waferllm.models.reference import ReferenceModel

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def hf_model(smollm):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    d, f = os.path.split(smollm.path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model


def _hf_logits(hf_model, ids):
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


def _hf_greedy_agrees(hf_model, ids, generated):
    """True when HF's greedy choice (its full forward, teacher-forced) at every step is our token.

    One forward over prompt + generation replaces 32 incremental ones; if every argmax agrees,
    HF greedy decoding produces exactly `generated`.
    """
    import torch

    with torch.no_grad():
        logits = hf_model(torch.tensor([list(ids) + list(generated)])).logits[0].numpy()
    choices = logits[len(ids) - 1: len(ids) - 1 + len(generated)].argmax(-1).tolist()
    return choices == list(generated), choices


def test_prefill_and_decode_logits_match(smollm, smollm_reference, hf_model):
    tok = smollm.tokenizer
    rm = smollm_reference.backend
    ids = tok.encode("The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the")
    extra = tok.encode(" Moon and came back safely")
    want = _hf_logits(hf_model, ids + extra)
    scale = np.abs(want).max()
    rm.reset()
    got = rm.prefill(ids)
    assert got.shape == (len(ids), smollm.config.vocab_size)
    assert np.abs(got - want[: len(ids)]).max() < 1e-4 * scale
    for j, t in enumerate(extra[:-1]):
        step = rm.decode(t)
        assert np.abs(step - want[len(ids) + j]).max() < 1e-4 * scale
    # prefill continued on a non-empty cache (chunked prefill) gives the same logits
    rm.reset()
    rm.prefill(ids[:5])
    chunk = rm.prefill(ids[5:])
    assert np.abs(chunk - want[5: len(ids)]).max() < 1e-4 * scale


def test_greedy_generation_matches_transformers(smollm, smollm_reference, hf_model):
    tok = smollm.tokenizer
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        # HF's generate() (KV-cached path) flips a near-tie (logit gap 0.04) on the chat prompt relative
        # to its own full forward, so the reference is greedy decoding with HF's full forward.
        out = smollm_reference.generate_ids(ids, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
        assert len(out.token_ids) == 32
        ok, hf_choices = _hf_greedy_agrees(hf_model, ids, out.token_ids)
        assert ok, (prompt, out.token_ids, hf_choices)
        assert out.finish_reason == "length"


def test_reference_float64_agrees(smollm):
    rm32 = ReferenceModel(smollm.weights)
    ids = smollm.tokenizer.encode("Hello, my name is")
    a = rm32.prefill(ids)
    rm64 = ReferenceModel(smollm.weights, dtype=np.float64)
    b = rm64.prefill(ids)
    assert np.abs(a - b).max() < 1e-3 * np.abs(b).max()
