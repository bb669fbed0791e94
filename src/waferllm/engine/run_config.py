"""``RunConfig``: how a model runs on the wafer, as one frozen value (vLLM's ``EngineArgs``).

The grids, the sequence lengths the placement is sized for, the datatype, the KV
cache scheme and the layers to place travel together from the user-facing entry points
(``LLM``, ``predict``) through the grid tuner to ``WaferModel`` and the placement
planner, which is the one place their fields are unpacked.

    run = RunConfig(prefill_grid=600, decode_grid=360, max_seq_len=2176, prompt_len=2048)
    run.with_grids(None, 360)      # a decode-only run, e.g. for tuning the decode grid
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from waferllm.engine.kvcache import SCHEMES
from waferllm.engine.placement import plan
from waferllm.errors import RequestError
from waferllm.hardware.plmr import DTYPE_BYTES
from waferllm.mesh.routes import POLICIES
from waferllm.models.quant import check_weights, resolve_weights


#: how a numeric run computes its values (never its cost): every primitive on the mesh, or
#: layers whose program has run once as dense array operations (see waferllm.engine.fused)
NUMERICS = ("fused", "mesh")

#: the switchable algorithms: the paper's design first, then what goes beyond it
ALGORITHMS = {
    "prefill_attention": ("paper", "streaming"),
    "decode_collectives": ("paper", "fused"),
    "gemv_ktree": ("paper", "tuned"),
    "gemv_overlap": ("paper", "segmented"),
}


@dataclass(frozen=True)
class RunConfig:
    """How one model runs on one wafer.

    Attributes:
        prefill_grid: side P of the square P x P regions prefill runs on; None places no
            prefill phase (a decode-only run) or, for the tuner, asks for it to be tuned.
        decode_grid: the same for decode.
        max_seq_len: tokens a request may hold in all (prompt + output): the decode KV
            cache is sized for it.
        prompt_len: prompt tokens the prefill activations are sized for (default
            ``max_seq_len``).
        dtype: ``fp16`` (what the paper evaluates) or ``fp32`` for weights, KV cache and
            activations; accumulation is always fp32.
        kv_scheme: ``shift`` (WaferLLM's balanced shift-based cache) or ``concat`` (the
            baseline that appends to the bottom row).
        layers: place and run only the first K layers and scale their time to the whole
            model (the paper's method for models that do not fit one wafer); None: all.
        route_policy: what a pattern needing more routes than a PE has does (see
            ``waferllm.mesh.routes``).
        weights: how the layers' matrices are stored on the PEs: ``fp16`` (dense, in
            ``dtype``), ``int8`` or ``int4`` (GGUF Q8_0 / Q4_0 blocks: integers plus an fp16
            scale per 32 values, dequantised by the PEs), or ``native`` (a GGUF file's own
            Q8_0 / Q4_0 blocks; resolved to int8 or int4 with :meth:`resolve_weights`
            before the run is planned).
        max_num_seqs: requests decoded together (a batch; 1 is the paper's setting). The
            decode KV cache is planned as a pool of ``max_num_seqs * max_seq_len`` tokens that
            the requests in flight share.
        prefill_attention: ``paper`` (score tiles of whole key ranges, heads per pass as SRAM
            allows) or ``streaming`` (flash-style: running max and sum, key blocks in flight).
        decode_collectives: ``paper`` (every reduction its own allreduce) or ``fused``
            (statistics ride with the neighbouring reduce: fewer collectives per layer).
        gemv_ktree: ``paper`` (K-tree with K=2 for every allreduce) or ``tuned`` (K and group
            chosen per reduction and grid by the cost model).
        gemv_overlap: ``paper`` (a decode GEMV's local product, then its reduce) or ``segmented``
            (the reduce streamed in segments of output columns, each chunk's product overlapping
            the previous segment's reduce; the count chosen per GEMV and grid by the cost model).
        speculative_tokens: drafts a verification pass checks (speculative decoding, see
            ``waferllm.engine.speculative``): decode budgets micro-batches of that many rows + 1.
        numerics: how a numeric run computes its values: ``fused`` (a layer whose program
            has already run replays that cost and computes its values as dense array
            operations: the same values to rounding, several times faster on the host) or
            ``mesh`` (every layer primitive by primitive). Predicted costs are the same.
    """

    prefill_grid: int | None = None
    decode_grid: int | None = None
    max_seq_len: int = 2048
    prompt_len: int | None = None
    dtype: str = "fp16"
    kv_scheme: str = "shift"
    layers: int | None = None
    route_policy: str = "relay"
    weights: str = "fp16"
    max_num_seqs: int = 1
    prefill_attention: str = "paper"
    decode_collectives: str = "paper"
    gemv_ktree: str = "paper"
    gemv_overlap: str = "paper"
    numerics: str = "fused"
    speculative_tokens: int = 0

    def __post_init__(self):
        for name in ("prefill_grid", "decode_grid", "max_seq_len", "prompt_len", "layers", "max_num_seqs"):
            value = getattr(self, name)
            if value is not None or name in ("max_seq_len", "max_num_seqs"):
                object.__setattr__(self, name, _positive(name, value))  # numpy ints become ints
        if self.dtype not in DTYPE_BYTES:
            raise RequestError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.kv_scheme not in SCHEMES:
            raise RequestError(f"kv_scheme must be one of {', '.join(SCHEMES)}, got {self.kv_scheme!r}")
        if self.route_policy not in POLICIES:
            raise RequestError(f"route_policy must be one of {', '.join(POLICIES)}, got {self.route_policy!r}")
        check_weights(self.weights)
        k = self.speculative_tokens
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise RequestError(f"speculative_tokens must be a whole number >= 0, got {k!r}")
        if self.numerics not in NUMERICS:
            raise RequestError(f"numerics must be one of {', '.join(NUMERICS)}, got {self.numerics!r}")
        for name, allowed in ALGORITHMS.items():
            if getattr(self, name) not in allowed:
                raise RequestError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    @property
    def kv_pool_tokens(self) -> int:
        """Tokens the decode KV cache holds for all requests in flight together."""
        return self.max_seq_len * self.max_num_seqs

    @classmethod
    def for_request(cls, input_len: int, output_len: int, **fields) -> "RunConfig":
        """Sized for one request of ``input_len`` prompt and ``output_len`` generated tokens."""
        return cls(max_seq_len=input_len + output_len, prompt_len=input_len, **fields)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def with_grids(self, prefill_grid: int | None, decode_grid: int | None) -> "RunConfig":
        return self.replace(prefill_grid=prefill_grid, decode_grid=decode_grid)

    def layer_count(self, config) -> int:
        """Layers placed and run for ``config``."""
        if self.layers is None:
            return config.num_layers
        if not 1 <= self.layers <= config.num_layers:
            raise RequestError(f"layers must be in 1..{config.num_layers}, got {self.layers}")
        return self.layers

    def resolve_weights(self, model=None) -> "RunConfig":
        """This run with ``weights="native"`` replaced by the format of ``model``'s GGUF file
        (int8 for Q8_0, int4 for Q4_0; anything else is refused)."""
        return self.replace(weights=resolve_weights(self.weights, model)) if self.weights == "native" else self

    def plan(self, config, wafer, suggest: bool = True):
        """The placement plan of this run (the one place the planner is called); ``suggest``:
        a does-not-fit error plans what would fit (the advice costs planning time)."""
        if self.weights == "native":
            raise RequestError("weights='native' takes the model file's own quantisation: resolve it first "
                               "(RunConfig.resolve_weights(model))", weights="native")
        # the decode KV pool holds every request in flight; prefill runs one prompt at a time, sized
        # for prompt_len (default: the whole request). Decode's cache fills its rows as kv_scheme
        # does: with concat, each request's prompt_len tokens spread over the rows, then every
        # generated token on the bottom row (no prompt_len: prompts of any length, so the whole
        # context may land there)
        return plan(config, wafer, self.prefill_grid, self.decode_grid, self.kv_pool_tokens, self.dtype,
                    prompt_len=self.prompt_len, layers=self.layer_count(config), weights=self.weights,
                    prefill_attention=self.prefill_attention, max_num_seqs=self.max_num_seqs,
                    verify_rows=self.speculative_tokens + 1,
                    request_len=self.max_seq_len, kv_scheme=self.kv_scheme, suggest=suggest)


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise RequestError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
