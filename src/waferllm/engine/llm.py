"""``LLM``: the user-facing API, shaped like vLLM's.

    from waferllm import LLM, SamplingParams
    llm = LLM(wafer="wse2")                                  # embedded SmolLM2, grids tuned
    out = llm.generate("The wafer-scale engine is", SamplingParams(max_tokens=32, temperature=0))[0]
    out.text, out.token_ids, out.metrics["ttft_s"], out.metrics["tpot_s"]

Every request runs numerically on the simulated wafer; its ``metrics`` hold the
predicted wafer figures (TTFT, TPOT, decode TPR, end-to-end TPR, energy, breakdowns,
SRAM and routes) from the same execution, and the host wall time of the simulation.
"""

from __future__ import annotations

import time
from typing import Sequence

from waferllm.engine.generate import OnToken, as_prompt_list, encode_prompt, generate_one
from waferllm.engine.outputs import RequestOutput
from waferllm.engine.predict import with_band
from waferllm.engine.run_config import RunConfig
from waferllm.engine.sampling import SamplingParams
from waferllm.engine.tuner import tune_grids
from waferllm.engine.wafer import WaferModel
from waferllm.errors import RequestError
from waferllm.hardware import get_wafer
from waferllm.hardware.plmr import WaferSpec

DEFAULT_MAX_MODEL_LEN = 512
NUMERIC_MAX_GRID = 48  # numeric runs tune grids up to this size (host time grows with the grid)


def _grid(value, what: str):
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, tuple):
        if value[0] != value[1]:
            raise RequestError(f"{what} must be square (P or PxP); got {value[0]}x{value[1]}")
        value = value[0]
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"{what} must be a positive integer or 'auto', got {value!r}") from None
    if v < 1:
        raise RequestError(f"{what} must be positive, got {v}")
    return v


class LLM:
    """A model placed on a simulated wafer. ``model``: GGUF file, HF directory, LoadedModel or None."""

    name = "wafer"

    def __init__(self, model=None, wafer: str | WaferSpec | None = "wse2", prefill_grid="auto", decode_grid="auto",
                 dtype: str = "fp16", kv_scheme: str = "shift", max_model_len: int | None = None,
                 wafer_overrides: dict | None = None, progress=None, band: bool = True):
        from waferllm.models.loader import resolve_model

        model = resolve_model(model)
        self.model = model
        self.tokenizer = model.tokenizer
        self.config = model.config
        spec = wafer if isinstance(wafer, WaferSpec) else get_wafer(wafer or "wse2")
        if wafer_overrides:
            spec = spec.replace(**wafer_overrides)
        self.wafer = spec
        self.max_model_len = int(max_model_len or min(DEFAULT_MAX_MODEL_LEN, self.config.max_position_embeddings))
        pg, dg = _grid(prefill_grid, "prefill_grid"), _grid(decode_grid, "decode_grid")
        run = RunConfig(prefill_grid=None if pg == "auto" else pg, decode_grid=None if dg == "auto" else dg,
                        max_seq_len=self.max_model_len, dtype=dtype, kv_scheme=kv_scheme)
        self.tuning = None
        if run.prefill_grid is None or run.decode_grid is None:
            # tuned for a request of a quarter of the context in and a quarter out
            quarter = max(1, self.max_model_len // 4)
            self.tuning = tune_grids(self.config, spec, run, input_len=quarter, output_len=quarter,
                                     max_grid=NUMERIC_MAX_GRID)
            run = self.tuning["run"]
        self.run = run
        self.band = band  # each request's metrics carry low/high bands (two shape-only reruns)
        self.backend = WaferModel(self.config, model.weights, spec, run, mode="numeric", progress=progress)

    @property
    def plan(self):
        return self.backend.plan

    def encode_prompt(self, prompt, chat: bool = False) -> tuple[str, list[int]]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 chat: bool = False, on_token: OnToken | None = None) -> list[RequestOutput]:
        """Generate for a prompt or a list of prompts (one request at a time, batch size 1 as in the paper)."""
        prompts = as_prompt_list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise RequestError(f"{len(sampling_params)} SamplingParams for {len(prompts)} prompts")
            plist = list(sampling_params)
        else:
            plist = [sampling_params or SamplingParams()] * len(prompts)
        outs = []
        for p, params in zip(prompts, plist):
            text, ids = self.encode_prompt(p, chat=chat)
            outs.append(self.generate_ids(ids, params, on_token=on_token, prompt=text))
        return outs

    def generate_ids(self, prompt_token_ids, params: SamplingParams | None = None, on_token: OnToken | None = None,
                     prompt: str | None = None) -> RequestOutput:
        params = params or SamplingParams()
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len "
                f"{self.max_model_len}; create the LLM with a larger max_model_len"
            )
        t0 = time.perf_counter()
        out = generate_one(self.backend, self.tokenizer, prompt_token_ids, params, on_token=on_token, prompt=prompt)
        host = out.metrics
        wafer = host.pop("backend", None) or self.backend.request_metrics()
        if self.band and out.token_ids:
            # the same request, shape only, with the wafer's assumed constants at both ends
            with_band(wafer, self.config, self.wafer, self.backend.run, len(prompt_token_ids), len(out.token_ids))
        out.metrics = {**wafer, "engine": self.name, "host": {**host, "wall_s": time.perf_counter() - t0,
                                                              "placement_wall_s": self.backend.placement_wall_s}}
        return out
