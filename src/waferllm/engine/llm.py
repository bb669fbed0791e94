"""``LLM``: the user-facing API, shaped like vLLM's.

    from waferllm import LLM, SamplingParams
    llm = LLM(wafer="wse2")                                  # embedded SmolLM2, grids tuned
    out = llm.generate("The wafer-scale engine is", SamplingParams(max_tokens=32, temperature=0))[0]
    out.text, out.token_ids, out.metrics["ttft_s"], out.metrics["tpot_s"]
    llm.chat([{"role": "user", "content": "What is a wafer-scale chip?"}])

Every request runs numerically on the simulated wafer; its ``metrics`` hold the
predicted wafer figures (TTFT, TPOT, decode TPR, end-to-end TPR, energy, breakdowns,
SRAM and routes) from the same execution, and the host wall time of the simulation.

Everything that can be checked without the model (grids, dtype, KV scheme, lengths,
the wafer) is checked before the model is loaded; the lengths against the model's
context, and whether the model fits, before anything is placed. A model that does not
fit is an error that offers only what was planned and fits.
"""

from __future__ import annotations

import numbers
import time
from waferllm.engine.generate import OnToken, PromptFrontend, check_lengths, check_token_ids, generate_one
from waferllm.engine.kvcache import SCHEMES
from waferllm.engine.outputs import RequestOutput
from waferllm.engine.placement import phase_fits, smallest_fitting_grid
from waferllm.engine.predict import RequestBands
from waferllm.engine.reference import check_max_model_len
from waferllm.engine.run_config import ALGORITHMS, RunConfig
from waferllm.engine.sampling import SamplingParams
from waferllm.engine.tuner import candidate_grids, tune_grids
from waferllm.engine.wafer import WaferModel
from waferllm.errors import PlacementError, RequestError, WaferLLMError, with_context
from waferllm.hardware import get_wafer
from waferllm.hardware.plmr import DTYPE_BYTES, WaferSpec

NUMERIC_MAX_GRID = 48  # numeric runs tune grids up to this size (host time grows with the grid)


def _grid(value, what: str):
    """``"auto"``/None, a positive int, ``"P"``, ``"PxP"`` or ``(P, P)`` -> "auto" or P."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    if isinstance(value, str):
        v = value.strip().lower()
        parts = v.split("x") if "x" in v else [v]
        try:
            value = tuple(int(p) for p in parts) if len(parts) == 2 else int(parts[0])
        except ValueError:
            raise RequestError(f"{what} must be a positive integer P (a PxP region) or 'auto', got {value!r}") from None
    if isinstance(value, tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise RequestError(f"{what} must be square (P or PxP): the engine runs on square regions; got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RequestError(f"{what} must be a positive integer P (a PxP region) or 'auto', got {value!r}")
    if value < 1:
        raise RequestError(f"{what} must be a positive integer P (a PxP region) or 'auto', got {value}")
    return int(value)


def check_engine_args(prefill_grid="auto", decode_grid="auto", dtype: str = "fp16", kv_scheme: str = "shift",
                      max_model_len=None) -> tuple:
    """Everything about a wafer run that needs neither the model nor the wafer: (prefill grid,
    decode grid), each "auto" or P. Raises a RequestError naming the argument."""
    pg, dg = _grid(prefill_grid, "prefill_grid"), _grid(decode_grid, "decode_grid")
    if dtype not in DTYPE_BYTES:
        raise RequestError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if kv_scheme not in SCHEMES:
        raise RequestError(f"kv_scheme must be one of {', '.join(SCHEMES)}, got {kv_scheme!r}")
    check_max_model_len(max_model_len, None)
    return pg, dg


def check_grids_fit_mesh(pg, dg, spec: WaferSpec) -> None:
    side = min(spec.rows, spec.cols)
    for what, g in (("prefill_grid", pg), ("decode_grid", dg)):
        if g != "auto" and g > side:
            raise RequestError(f"{what} {g} does not fit the {spec.rows}x{spec.cols} mesh of {spec.name} "
                               f"(largest square: {side}x{side})")


def _longest_fitting(config, spec, grids: dict, hi: int, dtype: str, weights: str = "fp16", seqs: int = 1,
                     verify_rows: int = 1) -> int:
    """The longest context (<= hi) whose phases plan on ``grids`` ({phase: grid}), the decode
    KV pool holding ``seqs`` such contexts; 0 if none. More tokens never need less SRAM, so a
    bisection finds it."""
    def fits(n: int) -> bool:
        return all(phase_fits(config, spec, g, ph, n, dtype, weights=weights, max_num_seqs=seqs,
                              verify_rows=verify_rows)
                   for ph, g in grids.items())

    if not fits(1):
        return 0
    lo, top = 1, hi
    if fits(top):
        return top
    while lo + 1 < top:  # fits(lo), not fits(top)
        mid = (lo + top) // 2
        lo, top = (mid, top) if fits(mid) else (lo, mid)
    return lo


class LLM(PromptFrontend):
    """A model placed on a simulated wafer. ``model``: GGUF file, HF directory, LoadedModel or None.

    ``max_num_seqs``: requests decoded together (``generate([...])`` batches them); the
    decode KV pool holds that many whole contexts. ``threads``: host threads for the
    simulation (BLAS and the simulator's workers), process-wide; None keeps the defaults.
    ``prefill_attention``, ``decode_collectives``, ``gemv_ktree``, ``gemv_overlap``: the paper's algorithms
    ("paper") or the ones beyond it (see :data:`waferllm.engine.run_config.ALGORITHMS`).
    ``numerics``: ``fused`` (layers whose program has run compute their values as dense array
    operations, their cost replayed) or ``mesh`` (every primitive); the same predictions.
    ``speculative_config``: speculative decoding with a draft on the PEs the model's decode
    leaves idle, a dict of :class:`waferllm.engine.speculative.SpeculativeConfig`'s fields
    (``{"draft_layers": 20, "num_speculative_tokens": 4}`` or ``{"draft_model": path}``);
    requests then run one at a time: greedy, with the same tokens as without it; sampled, with
    tokens distributed as without it (rejection sampling, the default ``acceptance_method``),
    or, with ``acceptance_method="exact"``, a seed's own tokens up to the verification pass's
    rounding.

    ``max_model_len``: tokens a request may hold (prompt + output). Default: the model's
    context, or, when the wafer cannot hold that on the grids allowed (given, or tuned up
    to ``NUMERIC_MAX_GRID``), the longest context it can; ``max_model_len_reason`` says
    which was chosen."""

    name = "wafer"

    def __init__(self, model=None, wafer: str | WaferSpec | None = "wse2", prefill_grid="auto", decode_grid="auto",
                 dtype: str = "fp16", kv_scheme: str = "shift", max_model_len: int | None = None,
                 wafer_overrides: dict | None = None, progress=None, band: bool = True, weights: str = "fp16",
                 max_num_seqs: int = 4, threads: int | None = None, prefill_attention: str = "paper",
                 decode_collectives: str = "paper", gemv_ktree: str = "paper", numerics: str = "fused",
                 gemv_overlap: str = "paper", speculative_config=None):
        from waferllm.models import quant
        from waferllm.models.loader import resolve_model

        # 1. what needs neither the model nor placement
        from waferllm.engine.speculative import SpeculativeConfig

        pg, dg = check_engine_args(prefill_grid, decode_grid, dtype, kv_scheme, max_model_len)
        self.speculative = SpeculativeConfig.coerce(speculative_config)
        # a verification pass's tokens run as rows of one micro-batch: the plan holds them
        self._verify_rows = self.speculative.num_speculative_tokens + 1 if self.speculative else 1
        if self.speculative is not None:
            max_num_seqs = 1  # a verification pass is the batch: requests run one after another
        quant.check_weights(weights)
        for name, value in (("prefill_attention", prefill_attention), ("decode_collectives", decode_collectives),
                            ("gemv_ktree", gemv_ktree), ("gemv_overlap", gemv_overlap)):
            if value not in ALGORITHMS[name]:
                raise RequestError(f"{name} must be one of {', '.join(ALGORITHMS[name])}, got {value!r}")
        if threads is not None:  # host threads (BLAS and the simulator's workers) for this process
            from waferllm.engine.threads import set_threads
            set_threads(threads)
        if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, numbers.Integral) or max_num_seqs < 1:
            raise RequestError(f"max_num_seqs must be a positive integer, got {max_num_seqs!r}")
        self.max_num_seqs = int(max_num_seqs)
        if wafer_overrides is not None and not isinstance(wafer_overrides, dict):
            raise RequestError(f"wafer_overrides must be a dict of wafer constants, got {type(wafer_overrides).__name__}")
        spec = wafer if isinstance(wafer, WaferSpec) else get_wafer(wafer or "wse2")
        if wafer_overrides:
            spec = spec.replace(**wafer_overrides)
        check_grids_fit_mesh(pg, dg, spec)
        self.wafer = spec

        # 2. the model, and the lengths against its context
        model = resolve_model(model)
        self.model = model
        self.tokenizer = model.tokenizer
        self.config = config = model.config
        # how the layers' matrices sit on the PEs: dense, or int8 / int4 blocks (native: the file's own)
        self.weights_format = wf = quant.resolve_weights(weights, model)
        ctx = config.max_position_embeddings
        fixed = {"prefill": None if pg == "auto" else pg, "decode": None if dg == "auto" else dg}
        auto_hi = min(NUMERIC_MAX_GRID, spec.rows, spec.cols)
        mml = check_max_model_len(max_model_len, config)
        if mml is None:
            limit = {ph: fixed[ph] or auto_hi for ph in fixed}
            mml = _longest_fitting(config, spec, limit, ctx, dtype, wf, self.max_num_seqs, self._verify_rows)
            if not mml:  # not even one token: the fit check below says why and what would fit
                mml = min(ctx, 512)
                self.max_model_len_reason = f"default {mml}: the grids allowed hold no context at all"
            elif mml == ctx:
                self.max_model_len_reason = f"default: {config.name}'s context"
            else:
                batch = f" for {self.max_num_seqs} requests at once (max_num_seqs)" if self.max_num_seqs > 1 else ""
                self.max_model_len_reason = (
                    f"default: the longest context {config.name} fits on {spec.name}{batch} with "
                    + " and ".join(f"{ph} grid {g}" if fixed[ph] else f"{ph} grids up to {g}" for ph, g in limit.items())
                    + f" ({config.name} allows {ctx})")
        else:
            self.max_model_len_reason = "given"
        self.max_model_len = mml

        # 3. does it fit? (planning only; the advice is planned too) then tune among the grids that fit
        cands = self._grids_that_fit(fixed, auto_hi, dtype)
        run = RunConfig(prefill_grid=fixed["prefill"], decode_grid=fixed["decode"], max_seq_len=mml, dtype=dtype,
                        kv_scheme=kv_scheme, weights=wf, max_num_seqs=self.max_num_seqs,
                        prefill_attention=prefill_attention, decode_collectives=decode_collectives,
                        gemv_ktree=gemv_ktree, numerics=numerics, gemv_overlap=gemv_overlap,
                        speculative_tokens=self.speculative.num_speculative_tokens if self.speculative else 0)
        self.tuning = None
        if fixed["prefill"] is None or fixed["decode"] is None:
            if progress:
                progress(0, None, "tuning grids")
            self.tuning = self._tune(run, cands, mml)
            run = self.tuning["run"]
        self.run = run
        # each request's metrics carry low/high bands (two shape-only reruns of the target alone)
        self.band = band and self.speculative is None
        self._bands: RequestBands | None = None  # kept between requests (see RequestBands)
        try:
            self.backend = WaferModel(config, quant.weights_for_run(model, wf, run.dtype), spec, run, mode="numeric",
                                      progress=progress)
        except WaferLLMError as exc:
            raise with_context(exc, f"placing {config.name} on {spec.name} (prefill {run.prefill_grid}x"
                                    f"{run.prefill_grid}, decode {run.decode_grid}x{run.decode_grid}, "
                                    f"max_model_len {mml})") from None
        if self.speculative is not None:
            self.backend = self._with_draft(self.backend, model, progress)

    def _with_draft(self, target: WaferModel, model, progress):
        """The target with the speculative config's draft placed on its idle PEs."""
        from waferllm.engine.speculative import check_vocabularies, speculative_backend
        from waferllm.models import quant
        from waferllm.models.loader import resolve_model

        spec, draft_config, draft_weights = self.speculative, None, None
        if spec.draft_model is not None:
            draft = resolve_model(spec.draft_model)
            check_vocabularies(self.config, draft.config)
            draft_config = draft.config
            draft_weights = quant.weights_for_run(draft, self.weights_format, target.run.dtype)
        try:
            return speculative_backend(target, spec, draft_config, draft_weights, progress)
        except WaferLLMError as exc:
            raise with_context(exc, f"placing the draft beside {self.config.name} on {self.wafer.name}") from None

    # ------------------------------------------------------------------ fitting
    def _grids_that_fit(self, fixed: dict, auto_hi: int, dtype: str) -> dict:
        """{phase: grids that plan for max_model_len}: the fixed grid, or the tuner's candidates
        up to ``auto_hi``; none for a phase -> a PlacementError with checked advice."""
        config, spec, mml = self.config, self.wafer, self.max_model_len
        cands, failed = {}, {}
        for ph, g in fixed.items():
            grids = [g] if g else candidate_grids(spec, hi=auto_hi)
            cands[ph] = [x for x in grids if phase_fits(config, spec, x, ph, mml, dtype, weights=self.weights_format,
                                                        verify_rows=self._verify_rows,
                                                        max_num_seqs=self.max_num_seqs)]
            if not cands[ph]:
                failed[ph] = max(grids)
        if failed:
            raise self._does_not_fit(fixed, failed, cands, dtype)
        return cands

    def _plan(self, prefill_grid, decode_grid, dtype: str):
        """The plan of this LLM's run on these grids (no advice): what placement will do."""
        return RunConfig(prefill_grid=prefill_grid, decode_grid=decode_grid, max_seq_len=self.max_model_len,
                         dtype=dtype, weights=self.weights_format, max_num_seqs=self.max_num_seqs,
                         speculative_tokens=self._verify_rows - 1).plan(self.config, self.wafer, suggest=False)

    def _does_not_fit(self, fixed: dict, failed: dict, cands: dict, dtype: str) -> PlacementError:
        """Why the model does not fit, and what would: grids and a context each checked by planning."""
        config, spec, mml = self.config, self.wafer, self.max_model_len
        whys = []
        for ph, g in failed.items():
            try:
                self._plan(g if ph == "prefill" else None, g if ph == "decode" else None, dtype)
                whys.append(f"{ph} on {g}x{g}: does not fit")  # pragma: no cover - phase_fits said no
            except PlacementError as exc:
                whys.append(exc.context.get("detail", str(exc)))
        where = " and ".join(f"{ph} on the given {g}x{g} grid" if fixed[ph] else f"{ph} on any grid up to {g}x{g}"
                             for ph, g in failed.items())
        options: list[tuple[str, str]] = []  # (kind, text): the CLI rewords some kinds for its own flags
        # grids: the smallest above the failed one that plans, per failing phase; the whole plan checked
        grids = {ph: smallest_fitting_grid(config, spec, ph, mml, dtype, g + 1, weights=self.weights_format,
                                           verify_rows=self._verify_rows,
                                           max_num_seqs=self.max_num_seqs)
                 for ph, g in failed.items()}
        if all(grids.values()):
            full = {ph: grids.get(ph) or max(cands[ph]) for ph in ("prefill", "decode")}
            try:
                self._plan(full["prefill"], full["decode"], dtype)
                options.append(("grid", " with ".join(f"{ph}_grid={grids[ph]} (--{ph}-grid {grids[ph]})" for ph in grids)
                                + (" (numeric runs on grids above 48 take longer on the host)"
                                   if max(grids.values()) > NUMERIC_MAX_GRID else "")))
            except PlacementError:  # pragma: no cover - each phase planned alone
                pass
        for ph, g in grids.items():
            if g is None:
                options.append(("no-grid", f"no {ph} grid of {spec.name} holds {mml} tokens, so a shorter context"))
        # a shorter context on the grids tried
        at = {ph: fixed[ph] or max(cands[ph] or [failed.get(ph, 1)]) for ph in ("prefill", "decode")}
        longest = _longest_fitting(config, spec, at, mml - 1, dtype, self.weights_format, seqs=self.max_num_seqs,
                                   verify_rows=self._verify_rows) if mml > 1 else 0
        if longest >= 2:
            options.append(("length", f"max_model_len={longest} (--max-model-len {longest}) on these grids"))
        options.append(("wafer", "a wafer with more SRAM per PE (a wafer file, or wafer_overrides)"))
        nothing = "hold no context at all" in self.max_model_len_reason
        detail = (f"{config.name} does not fit {spec.name} with max_model_len {mml}"
                  + (" (the default; not even one token fits)" if nothing else "") + f": {where}. "
                  + " ".join(w.rstrip(".") + "." for w in whys))
        msg = detail + " What would fit (each checked by planning it): " + "; or ".join(t for _, t in options) + "."
        return PlacementError(msg, phases=list(failed), fit_grids=grids, longest=longest or None, detail=detail,
                              options=options, grids_tried=at)

    def _tune(self, run: RunConfig, cands: dict, mml: int) -> dict:
        """Fastest grids among those that fit, by predicted time for a request of a quarter of
        the context in and a quarter out (each phase among its own candidates)."""
        quarter = max(1, mml // 4)
        tried: dict = {"prefill": {}, "decode": {}}
        grids = {"prefill": run.prefill_grid, "decode": run.decode_grid}
        for ph in ("prefill", "decode"):
            if grids[ph] is not None:
                continue
            other = {"prefill": "decode", "decode": "prefill"}[ph]
            trial = run.replace(**{f"{ph}_grid": None, f"{other}_grid": grids[other] or cands[other][-1]})
            out = tune_grids(self.config, self.wafer, trial, input_len=quarter, output_len=quarter,
                             candidates=cands[ph])
            grids[ph] = out[f"{ph}_grid"]
            tried[ph] = out["tried"][ph]
        return {"prefill_grid": grids["prefill"], "decode_grid": grids["decode"], "tried": tried,
                "run": run.with_grids(grids["prefill"], grids["decode"])}

    # ------------------------------------------------------------------ requests
    @property
    def plan(self):
        return self.backend.plan

    def run_requests(self, encoded: list, plist: list, on_token: OnToken | None = None) -> list[RequestOutput]:
        """Several requests at once decode as a batch (continuous batching, up to
        ``max_num_seqs`` in flight); one request, a batch size of 1, or a streaming callback
        run them one after another. Greedy tokens are the same either way."""
        if len(encoded) == 1 or self.max_num_seqs == 1 or on_token is not None:
            return super().run_requests(encoded, plist, on_token)
        from waferllm.engine.scheduler import Scheduler

        t0 = time.perf_counter()
        sched = Scheduler(self, max_waiting=len(encoded))
        ids = [sched.add_request(tok_ids, params, prompt=text) for (text, tok_ids), params in zip(encoded, plist)]
        done = sched.run_to_completion()
        outs = []
        for rid in ids:
            out = done[rid]
            wafer = out.metrics.pop("wafer")
            n = len(out.token_ids)
            out.metrics = {**wafer, "wafer": self.wafer.name, "engine": self.name, "batched": len(ids),
                           "max_num_seqs": self.max_num_seqs, "max_model_len": self.max_model_len,
                           "e2e_tokens_per_s": n / wafer["e2e_s"] if wafer.get("e2e_s") else None,
                           "host": {**out.metrics, "wall_s": time.perf_counter() - t0,
                                    "placement_wall_s": self.backend.placement_wall_s}}
            outs.append(out)
        return outs

    def check_request(self, prompt_token_ids, params: SamplingParams) -> None:
        check_lengths(len(prompt_token_ids), params.max_tokens, self.max_model_len, self.config.name,
                      self.config.max_position_embeddings)

    def generate_ids(self, prompt_token_ids, params: SamplingParams | dict | None = None,
                     on_token: OnToken | None = None, prompt: str | None = None) -> RequestOutput:
        """Generate for a prompt given as token ids."""
        params = SamplingParams.coerce(params)
        ids = check_token_ids(prompt_token_ids, self.config.vocab_size)
        self.check_request(ids, params)
        t0 = time.perf_counter()
        out = generate_one(self.backend, self.tokenizer, ids, params, on_token=on_token, prompt=prompt)
        host = out.metrics
        wafer = host.pop("backend", None) or self.backend.request_metrics()
        if self.band and out.token_ids:
            # the same request, shape only, with the wafer's assumed constants at both ends
            if self._bands is None:
                self._bands = RequestBands(self.config, self.wafer, self.backend.run)
            self._bands.add(wafer, len(ids), len(out.token_ids), restored=wafer.get("restore_s", 0.0) > 0)
        out.metrics = {**wafer, "engine": self.name, "max_model_len": self.max_model_len,
                       "host": {**host, "wall_s": time.perf_counter() - t0,
                                "placement_wall_s": self.backend.placement_wall_s}}
        return out


__all__ = ["LLM", "NUMERIC_MAX_GRID", "check_engine_args", "check_grids_fit_mesh"]
