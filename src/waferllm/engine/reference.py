"""``ReferenceEngine``: the dense numpy forward behind the shared generation loop.

It produces the tokens the wafer engine must reproduce, and is what
``waferllm generate --engine reference`` runs. Its API is the wafer engine's (``LLM``):
``generate`` (text, token ids, chat messages), ``chat`` and ``generate_ids``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from waferllm.engine.generate import OnToken, PromptFrontend, check_lengths, check_token_ids, generate_one
from waferllm.engine.outputs import RequestOutput
from waferllm.engine.sampling import SamplingParams
from waferllm.errors import RequestError
from waferllm.models.reference import ReferenceModel


class DenseBackend(ReferenceModel):
    """The dense forward behind the generation loop's backend protocol (it computes every
    prompt row anyway, so ``prompt_logits`` changes nothing)."""

    def prefill(self, token_ids, prompt_logits: bool = True) -> np.ndarray:
        return super().prefill(token_ids)


def check_max_model_len(max_model_len, config) -> int | None:
    """``max_model_len`` (None or a positive integer up to the model's context), as an int."""
    if max_model_len is None:
        return None
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, (int, np.integer)) or max_model_len < 1:
        raise RequestError(f"max_model_len must be a positive integer, got {max_model_len!r}")
    if config is not None and max_model_len > config.max_position_embeddings:
        raise RequestError(f"max_model_len {max_model_len} is more than {config.name}'s context of "
                           f"{config.max_position_embeddings} tokens (max_position_embeddings); use at most "
                           f"{config.max_position_embeddings}")
    return int(max_model_len)


class ReferenceEngine(PromptFrontend):
    """``ReferenceEngine(model)``: ``model`` is a ``LoadedModel``, a path, or ``None`` (embedded SmolLM2).

    ``max_seq_len`` (or its vLLM name ``max_model_len``): tokens a request may hold, prompt
    and output (default and at most: the model's context). ``progress(done, total, what)``
    is called as the layers are loaded."""

    name = "reference"

    def __init__(self, model=None, dtype="float32", max_seq_len: int | None = None, progress=None,
                 max_model_len: int | None = None):
        from waferllm.models.loader import resolve_model

        if max_seq_len is not None and max_model_len is not None and max_seq_len != max_model_len:
            raise RequestError("give max_seq_len or max_model_len (the same thing), not both")
        check_max_model_len(max_model_len if max_model_len is not None else max_seq_len, None)
        try:
            if np.dtype(dtype).kind != "f":
                raise TypeError(dtype)
        except TypeError:
            raise RequestError(f"dtype must be a numpy float type (float32, float64, float16), got {dtype!r}") from None
        model = resolve_model(model)
        self.model = model
        self.tokenizer = model.tokenizer
        self.config = model.config
        self.max_model_len = check_max_model_len(max_model_len if max_model_len is not None else max_seq_len,
                                                 self.config) or self.config.max_position_embeddings
        n = len(model.weights.layers)
        for i in range(n):  # dequantise the layers now (the backend keeps them), reporting progress
            model.weights.layers[i]
            if progress:
                progress(i + 1, n, f"loading layer {i}")
        self.backend = DenseBackend(model.weights, dtype=dtype, max_seq_len=self.max_model_len)

    def check_request(self, prompt_token_ids, params: SamplingParams) -> None:
        check_lengths(len(prompt_token_ids), params.max_tokens, self.max_model_len, self.config.name,
                      self.config.max_position_embeddings)

    def generate_ids(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                     on_token: OnToken | None = None, prompt: str | None = None) -> RequestOutput:
        params = SamplingParams.coerce(params)
        ids = check_token_ids(prompt_token_ids, self.config.vocab_size)
        self.check_request(ids, params)
        out = generate_one(self.backend, self.tokenizer, ids, params, on_token=on_token, prompt=prompt)
        out.metrics["engine"] = self.name
        out.metrics["max_model_len"] = self.max_model_len
        return out
