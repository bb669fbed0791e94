"""``ReferenceEngine``: the dense numpy forward behind the shared generation loop.

It produces the tokens the wafer engine must reproduce, and is what
``waferllm generate --engine reference`` runs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from waferllm.engine.generate import OnToken, as_prompt_list, encode_prompt, generate_one
from waferllm.engine.outputs import RequestOutput
from waferllm.engine.sampling import SamplingParams
from waferllm.models.reference import ReferenceModel


class DenseBackend(ReferenceModel):
    """The dense forward behind the generation loop's backend protocol (it computes every
    prompt row anyway, so ``prompt_logits`` changes nothing)."""

    def prefill(self, token_ids, prompt_logits: bool = True) -> np.ndarray:
        return super().prefill(token_ids)


class ReferenceEngine:
    """``ReferenceEngine(model)``: ``model`` is a ``LoadedModel``, a path, or ``None`` (embedded SmolLM2)."""

    name = "reference"

    def __init__(self, model=None, dtype="float32", max_seq_len: int | None = None):
        from waferllm.models.loader import resolve_model

        model = resolve_model(model)
        self.model = model
        self.tokenizer = model.tokenizer
        self.config = model.config
        self.backend = DenseBackend(model.weights, dtype=dtype, max_seq_len=max_seq_len)

    def encode_prompt(self, prompt: str | Sequence[dict], chat: bool = False) -> tuple[str, list[int]]:
        """The prompt text (after the chat template, when ``chat``) and its token ids."""
        return encode_prompt(self.tokenizer, prompt, chat)

    def generate(self, prompts, params: SamplingParams | None = None, chat: bool = False,
                 on_token: OnToken | None = None) -> list[RequestOutput]:
        """Generate for one prompt (a string, or a list of chat messages) or a list of string prompts."""
        params = params or SamplingParams()
        outs = []
        for p in as_prompt_list(prompts):
            text, ids = self.encode_prompt(p, chat=chat)
            outs.append(self.generate_ids(ids, params, on_token=on_token, prompt=text))
        return outs

    def generate_ids(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                     on_token: OnToken | None = None, prompt: str | None = None) -> RequestOutput:
        out = generate_one(self.backend, self.tokenizer, prompt_token_ids, params or SamplingParams(),
                           on_token=on_token, prompt=prompt)
        out.metrics["engine"] = self.name
        return out
