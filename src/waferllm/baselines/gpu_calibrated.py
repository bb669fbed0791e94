"""Calibrated GPU baseline: the roofline's terms with efficiencies fitted to measured serving runs.

The roofline (:mod:`waferllm.hardware.gpu_roofline`) is the ideal bound. A real serving
engine (SGLang, vLLM) at batch 1 reaches a fraction of the GPU's peaks and pays fixed
costs the roofline ignores. This module fits those to measurements, with the same cost
terms (:func:`waferllm.hardware.gpu_roofline.gpu_inference`) and seven factors:

==============================  ==========================================================
``flops``                       fraction of the tensor-core peak the prefill matmuls reach
``hbm``                         fraction of the HBM bandwidth the decode steps reach
``link``                        fraction of the ring's link bandwidth an allreduce reaches
``allreduce_extra_latency_s``   per allreduce inside a node, beyond the NVLink floor
``internode_extra_latency_s``   per allreduce that crosses nodes, beyond the InfiniBand floor
``layer_overhead_s``            per layer of every forward pass (kernel launches, syncs)
``step_overhead_s``             per forward pass (scheduling, sampling)
==============================  ==========================================================

Fractions are <= 1 and fixed costs >= 0, so the calibrated model is never faster than
the roofline. Tensor parallelism over 2 nodes of 8 is slower than over 8 GPUs for
decode because every one of the 2 x layers allreduces per token pays the crossing-node
latency; for prefill because the ring then runs at the InfiniBand bandwidth.

The fit (:func:`fit_gpu`) minimises the sum of squared ``log(model / measured)`` over
the absolute measurements of one GPU (by default the SGLang A100 runs of SPEC section 5
in ``waferllm/hardware/measurements.toml``; or a file written by
``benchmarks/gpu_measure.py``), by Levenberg-Marquardt from several starts. Only the
factors the measurements constrain are free (no prefill: ``flops`` is kept; one GPU
only: the allreduce factors are kept; one node only: the crossing-node latency is kept).
The result is written to ``hardware/gpus/fits/<gpu>.toml`` with each factor's provenance
and the per-measurement residuals. A GPU without a fit of its own inherits the fit of
its preset's ``efficiency_from`` (status ``derived``).

Measurement args: ``model`` (a preset of :mod:`waferllm.models.presets`), ``gpus`` (a
count; beyond ``gpus_per_node`` the group spans whole nodes), and optionally ``gpu``
(default ``a100``), ``input_len`` (default 4096) and ``output_len`` (default 128): the
SPEC section 5 runs are batch 1, fp16, at 4K context.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from waferllm.errors import HardwareError, ModelError
from waferllm.hardware.gpu import GPUSpec, get_gpu
from waferllm.hardware.gpu_roofline import Efficiency, gpu_inference, with_provenance
from waferllm.hardware.plmr import Provenance

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore

#: The SPEC section 5 GPU runs: SGLang on A100-80GB, batch 1, fp16, 4K context.
DEFAULT_GPU = "a100"
DEFAULT_INPUT_LEN = 4096
DEFAULT_OUTPUT_LEN = 128
EVALUATORS = {"gpu_decode_tpr": "decode_tokens_per_s", "gpu_prefill_tps": "prefill_tokens_per_s"}

#: factor -> (kind, unit, meaning, start of the fit)
FACTORS: dict[str, tuple[str, str, str, float]] = {
    "flops": ("fraction", "of peak", "fraction of the tensor-core peak reached by the matmuls", 0.6),
    "hbm": ("fraction", "of peak", "fraction of the HBM bandwidth reached", 0.8),
    "link": ("fraction", "of peak", "fraction of the ring's link bandwidth reached by an allreduce", 0.5),
    "allreduce_extra_latency_s": ("seconds", "s", "latency per allreduce inside a node beyond the NVLink floor", 5e-6),
    "internode_extra_latency_s": ("seconds", "s", "latency per allreduce crossing nodes beyond the InfiniBand floor",
                                  20e-6),
    "layer_overhead_s": ("seconds", "s", "fixed cost per layer of a forward pass (kernel launches, syncs)", 20e-6),
    "step_overhead_s": ("seconds", "s", "fixed cost per forward pass (scheduling, sampling)", 200e-6),
}
_TIME_SCALE = 1e-5  # seconds per unit of the fit's variable for a fixed cost
_PRIOR_WEIGHT = 1e-8  # keeps factors the measurements leave flat at their start, nothing more
_STARTS = (1.0, 0.3, 3.0)  # fixed costs' starts are FACTORS' start times these


# ------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class GPUFit:
    """Efficiency factors of one GPU with their provenance, and how well they reproduce its measurements."""

    gpu: str  # preset key the factors were fitted on
    efficiency: Efficiency
    provenance: dict[str, Provenance]
    fitted_to: str
    measurement_ids: tuple[str, ...] = ()
    residuals: tuple[dict, ...] = ()  # {id, quantity, unit, measured, model, error}
    loss: float = 0.0
    max_abs_error: float = 0.0
    date: str = ""
    derived_for: str | None = None  # set when another GPU inherits this fit

    def for_gpu(self, key: str) -> "GPUFit":
        """This fit as inherited by GPU ``key``: every factor ``derived``."""
        if key == self.gpu:
            return self
        prov = {k: Provenance(f"inherited from the {self.gpu} fit, no measurement of {key} yet: {p.source}", "derived")
                for k, p in self.provenance.items()}
        return GPUFit(self.gpu, self.efficiency, prov, self.fitted_to, self.measurement_ids, self.residuals,
                      self.loss, self.max_abs_error, self.date, derived_for=key)

    def factors(self) -> dict[str, dict]:
        eff = self.efficiency.to_dict()
        return {k: {"value": eff[k], "unit": FACTORS[k][1], "meaning": FACTORS[k][2], **self.provenance[k].to_dict()}
                for k in FACTORS}

    def provenance_dict(self) -> dict:
        return {
            "fit_gpu": self.gpu,
            "derived": self.derived_for is not None,
            "fitted_to": self.fitted_to,
            "fit_date": self.date,
            "efficiency": self.factors(),
            "measurements": list(self.measurement_ids),
            "residuals": [dict(r) for r in self.residuals],
            "max_abs_error": self.max_abs_error,
        }


@dataclass(frozen=True)
class Request:
    """What one GPU measurement measured: which quantity, of which model, on which setup."""

    model: str
    gpu: str
    gpus: int
    input_len: int
    output_len: int
    quantity: str  # a key of gpu_inference's result


def measurement_request(m) -> Request:
    """The request a GPU measurement (a :class:`~waferllm.hardware.measurements.Measurement`) describes."""
    if m.model not in EVALUATORS:
        raise HardwareError(f"measurement {m.id}: {m.model!r} is not a GPU quantity ({', '.join(EVALUATORS)})")
    args = dict(m.args)
    unknown = set(args) - {"model", "gpus", "gpu", "input_len", "output_len"}
    if unknown or "model" not in args or "gpus" not in args:
        raise HardwareError(f"measurement {m.id}: args need model and gpus (and may give gpu, input_len, "
                            f"output_len); got {', '.join(sorted(args)) or 'none'}")
    try:
        return Request(str(args["model"]), get_gpu(str(args.get("gpu", DEFAULT_GPU))).key, int(args["gpus"]),
                       int(args.get("input_len", DEFAULT_INPUT_LEN)), int(args.get("output_len", DEFAULT_OUTPUT_LEN)),
                       EVALUATORS[m.model])
    except (TypeError, ValueError) as exc:
        raise HardwareError(f"measurement {m.id}: bad args {args}: {exc}") from None


def _config(name: str):
    from waferllm.models.presets import get_model_preset

    return get_model_preset(name)


def model_value(req: Request, efficiency: Efficiency, gpu: GPUSpec | None = None) -> float:
    """The cost model's value of a measured quantity under ``efficiency``."""
    r = gpu_inference(_config(req.model), gpu or get_gpu(req.gpu), req.gpus, input_len=req.input_len,
                      output_len=req.output_len, efficiency=efficiency)
    return r[req.quantity]


def measurement_value(m, baseline: str = "calibrated", fit: "GPUFit | None" = None) -> float:
    """The ``roofline`` or ``calibrated`` model's value of one GPU measurement (for `waferllm validate`)."""
    req = measurement_request(m)
    if baseline == "roofline":
        return model_value(req, Efficiency())
    if baseline != "calibrated":
        raise HardwareError(f"baseline must be 'roofline' or 'calibrated', got {baseline!r}")
    return model_value(req, (fit or load_fit(req.gpu)).efficiency)


# ------------------------------------------------------------------------------ stored fits
def fits_dir() -> Path:
    return Path(str(resources.files("waferllm.hardware") / "gpus" / "fits"))


def _read_fit(path: Path) -> GPUFit:
    """The fit stored in ``path`` (read once per version of the file)."""
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = None
    return _read_fit_at(path, stamp)


@lru_cache(maxsize=32)
def _read_fit_at(path: Path, stamp) -> GPUFit:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise HardwareError(f"{path}: cannot read the GPU fit: {exc}") from None
    raw = data.get("efficiency", {})
    missing = set(FACTORS) - set(raw)
    if missing:
        raise HardwareError(f"{path}: efficiency lacks {', '.join(sorted(missing))}")
    values, prov = {}, {}
    for k in FACTORS:
        entry = raw[k]
        if not isinstance(entry, dict) or "value" not in entry:
            raise HardwareError(f"{path}: efficiency.{k} must be a table with value, source and status")
        values[k] = float(entry["value"])
        prov[k] = Provenance(str(entry.get("source", str(path))), str(entry.get("status", "user")))
    return GPUFit(
        gpu=str(data.get("gpu", path.stem)), efficiency=Efficiency(**values), provenance=prov,
        fitted_to=str(data.get("fitted_to", "")), measurement_ids=tuple(r["id"] for r in data.get("residual", [])),
        residuals=tuple(data.get("residual", [])), loss=float(data.get("loss", 0.0)),
        max_abs_error=float(data.get("max_abs_error", 0.0)), date=str(data.get("date", "")),
    )


def load_fit(gpu: str | GPUSpec = DEFAULT_GPU, path: str | Path | None = None) -> GPUFit:
    """The efficiency fit a GPU uses: its own (``fits/<gpu>.toml``, or ``path``), else its preset's
    ``efficiency_from`` fit, inherited (``derived``)."""
    spec = gpu if isinstance(gpu, GPUSpec) else get_gpu(gpu)
    if path is not None:
        return _read_fit(Path(path))
    key = spec.key or spec.name
    own = fits_dir() / f"{key}.toml"
    if own.is_file():
        return _read_fit(own)
    source = spec.efficiency_from or DEFAULT_GPU
    other = fits_dir() / f"{source}.toml"
    if not other.is_file():
        raise HardwareError(f"{spec.name}: no efficiency fit of its own nor of {source!r} ({other} is missing); "
                            f"run benchmarks/gpu_calibrate.py --gpu {source} --write")
    return _read_fit(other).for_gpu(key)


def _toml_str(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_num(v: float) -> str:
    return repr(float(v)) if v else "0.0"


def fit_to_toml(fit: GPUFit) -> str:
    lines = [
        f"# Serving-engine efficiency of the {fit.gpu} GPU preset, fitted by waferllm.baselines.gpu_calibrated",
        "# (benchmarks/gpu_calibrate.py). Written by the fit with its residuals: refit rather than edit.",
        f"gpu = {_toml_str(fit.gpu)}",
        f"fitted_to = {_toml_str(fit.fitted_to)}",
        f"date = {_toml_str(fit.date)}",
        f"loss = {_toml_num(fit.loss)}",
        f"max_abs_error = {_toml_num(fit.max_abs_error)}",
        "",
        "[efficiency]",
    ]
    eff = fit.efficiency.to_dict()
    for k in FACTORS:
        p = fit.provenance[k]
        lines.append(f"{k} = {{ value = {_toml_num(eff[k])}, source = {_toml_str(p.source)}, "
                     f"status = {_toml_str(p.status)} }}")
    for r in fit.residuals:
        lines += ["", "[[residual]]"] + [f"{k} = {_toml_str(v) if isinstance(v, str) else _toml_num(v)}"
                                          for k, v in r.items()]
    return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return _toml_num(v)


def measurements_to_toml(entries: Iterable[dict], header: str = "") -> str:
    """Measurement entries (dicts with the fields of ``hardware/measurements.toml``) as that file's TOML."""
    lines = [f"# {line}" for line in header.splitlines()]
    for e in entries:
        lines += ["", "[[measurement]]"] + [f"{k} = {_toml_value(v)}" for k, v in e.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def write_fit(fit: GPUFit, path: str | Path | None = None) -> Path:
    """Store a fit (default ``hardware/gpus/fits/<gpu>.toml``); returns the path."""
    path = Path(path) if path else fits_dir() / f"{fit.gpu}.toml"
    path.write_text(fit_to_toml(fit), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ the fit
def _to_value(name: str, z: float) -> float:
    if FACTORS[name][0] == "fraction":
        return 1.0 / (1.0 + math.exp(-z))
    return _TIME_SCALE * math.exp(min(z, 50.0))  # log scale: from far below a microsecond to seconds


def _to_var(name: str, value: float) -> float:
    if FACTORS[name][0] == "fraction":
        v = min(max(value, 1e-9), 1 - 1e-9)
        return math.log(v / (1 - v))
    return math.log(max(value, 1e-15) / _TIME_SCALE)


def free_factors(requests: Iterable[Request], gpu: GPUSpec) -> list[str]:
    """The factors a set of measurements constrains (the others keep their base values)."""
    reqs = list(requests)
    decode = [r for r in reqs if r.quantity == "decode_tokens_per_s"]
    prefill = [r for r in reqs if r.quantity == "prefill_tokens_per_s"]
    free = []
    if prefill:
        free.append("flops")
    if decode:
        free += ["hbm", "layer_overhead_s"]
        if len({_config(r.model).num_layers for r in decode}) > 1:
            free.append("step_overhead_s")
    if any(r.gpus > 1 for r in prefill):
        free.append("link")
    if any(r.gpus > 1 for r in decode):
        free.append("allreduce_extra_latency_s")
    if any(r.gpus > gpu.gpus_per_node for r in reqs):
        free.append("internode_extra_latency_s")
    return [k for k in FACTORS if k in free]


def _levenberg_marquardt(residuals: Callable[[np.ndarray], np.ndarray], z0: np.ndarray, iters: int = 200):
    """Least squares by Levenberg-Marquardt with a forward-difference Jacobian; returns (z, cost)."""
    z = np.asarray(z0, float)
    r = residuals(z)
    cost, lam = float(r @ r), 1e-3
    for _ in range(iters):
        h = 1e-6 * (1.0 + np.abs(z))
        J = np.stack([(residuals(z + h[i] * np.eye(len(z))[i]) - r) / h[i] for i in range(len(z))], axis=1)
        A, g = J.T @ J, J.T @ r
        while True:
            step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), -g)
            r_new = residuals(z + step)
            c_new = float(r_new @ r_new)
            if c_new < cost:
                break
            lam *= 4.0
            if lam > 1e12:
                return z, cost
        improvement = cost - c_new
        z, r, cost, lam = z + step, r_new, c_new, max(lam / 3.0, 1e-12)
        if improvement < 1e-14 * (1.0 + cost):
            break
    return z, cost


def _round(value: float, kind: str) -> float:
    if kind == "seconds" and value < 1e-9:
        return 0.0  # at its bound
    return float(f"{value:.3g}")


def fit_gpu(gpu: str = DEFAULT_GPU, measurements: "str | Path | list | None" = None,
            base: GPUFit | None = None, iters: int = 200) -> GPUFit:
    """Fit ``gpu``'s efficiency factors to its absolute GPU measurements.

    ``measurements``: a TOML file in the format of ``hardware/measurements.toml`` (for
    example one written by ``benchmarks/gpu_measure.py``), a list of measurements, or
    ``None`` for the project's data (SPEC section 5). Factors the measurements do not
    constrain keep their value from ``base`` (default: the fit ``gpu`` uses now).

    (Long on purpose: reading the measurements, choosing the free factors, the bounded
    search and the residual table are one pass over the same request list.)
    """
    from waferllm.hardware.measurements import load_measurements

    spec = get_gpu(gpu)
    source_file = None
    if measurements is None or isinstance(measurements, (str, Path)):
        source_file = measurements
        measurements = load_measurements(measurements, system="gpu")
    ms = [m for m in measurements if m.absolute and m.model in EVALUATORS]
    reqs = []
    for m in ms:
        req = measurement_request(m)
        if req.gpu == spec.key:
            reqs.append((m, req))
    if not reqs:
        raise HardwareError(f"no absolute GPU measurement of {spec.name} to fit"
                            + (f" in {source_file}" if source_file else ""))
    for m, req in reqs:
        try:
            _config(req.model)
        except ModelError as exc:
            raise HardwareError(f"measurement {m.id}: {exc}") from None
    free = free_factors([r for _, r in reqs], spec)
    if base is None:
        try:
            base = load_fit(spec)
        except HardwareError:
            base = None
    start = base.efficiency.to_dict() if base else {k: v[3] for k, v in FACTORS.items()}

    def eff_of(z) -> Efficiency:
        vals = dict(start)
        vals.update({k: _to_value(k, float(zi)) for k, zi in zip(free, z)})
        return Efficiency(**vals)

    def residuals(z, z_prior) -> np.ndarray:
        eff = eff_of(z)
        res = [math.log(model_value(req, eff, spec) / m.value) for m, req in reqs]
        return np.concatenate([res, math.sqrt(_PRIOR_WEIGHT) * (np.asarray(z) - z_prior)])

    best = None
    for scale in _STARTS:  # several starts: the fixed costs' scale is the least certain
        z0 = np.array([_to_var(k, FACTORS[k][3] * (scale if FACTORS[k][0] == "seconds" else 1.0)) for k in free])
        z, cost = _levenberg_marquardt(lambda z: residuals(z, z0), z0, iters)
        if best is None or cost < best[1]:
            best = (z, cost)
    fitted = eff_of(best[0]).to_dict()
    values = {k: (_round(fitted[k], FACTORS[k][0]) if k in free else start[k]) for k in FACTORS}

    def loss_of(vals) -> float:
        eff = Efficiency(**vals)
        return sum(math.log(model_value(req, eff, spec) / m.value) ** 2 for m, req in reqs)

    at_bound = set()
    for k in free:  # a fixed cost the fit drove to its bound is stored as exactly 0
        if FACTORS[k][0] == "seconds" and values[k] and loss_of({**values, k: 0.0}) <= loss_of(values) + 1e-6:
            values[k] = 0.0
        if FACTORS[k][0] == "seconds" and values[k] == 0.0:
            at_bound.add(k)
    eff = Efficiency(**values)

    rows = []
    for m, req in reqs:
        v = model_value(req, eff, spec)
        rows.append({"id": m.id, "quantity": m.quantity, "unit": m.unit, "measured": m.value,
                     "model": float(f"{v:.5g}"), "error": float(f"{v / m.value - 1:.4f}")})
    loss = loss_of(values)
    worst = max(abs(r["error"]) for r in rows)
    stamp = time.strftime("%Y-%m-%d")
    where = str(source_file) if source_file else "waferllm/hardware/measurements.toml (SPEC section 5)"
    fitted_to = (f"{len(rows)} absolute measurements of {spec.name} in {where}: "
                 + "; ".join(sorted({m.source for m, _ in reqs})))
    summary = (f"fitted by waferllm.baselines.gpu_calibrated.fit_gpu (least squares on log(model/measured)) to "
               f"{len(rows)} measurements of {spec.name} in {where}; loss {loss:.4f}, largest error {worst:.1%}, {stamp}")
    prov = {}
    for k in FACTORS:
        if k in free:
            prov[k] = Provenance(summary + ("; at its bound 0: the measurements ask for none" if k in at_bound else ""),
                                 "calibrated")
        elif base is not None:
            p = base.provenance[k]
            prov[k] = Provenance(f"not constrained by these measurements; kept: {p.source}", p.status)
        else:
            prov[k] = Provenance("not constrained by these measurements; the fit's start value", "assumed")
    return GPUFit(spec.key, eff, prov, fitted_to, tuple(r["id"] for r in rows), tuple(rows), round(loss, 6),
                  round(worst, 4), stamp)


def fit_table(fit: GPUFit) -> str:
    """The fitted factors and the per-measurement table (measured, model, error), as text."""
    out = [f"GPU efficiency fit for {fit.gpu}: {fit.fitted_to}", ""]
    out.append(f"{'factor':<28} {'value':>12}  {'status':<10} meaning")
    for k, f in fit.factors().items():
        v = f["value"]
        shown = f"{v * 1e6:.3g} us" if f["unit"] == "s" else f"{v:.3g}"
        out.append(f"{k:<28} {shown:>12}  {f['status']:<10} {f['meaning']}")
    g, e = get_gpu(fit.gpu), fit.efficiency
    inside = g.nvlink_latency_s + e.allreduce_extra_latency_s
    meaning = (f"what they mean on {g.name}: {e.flops * g.peak_flops_fp16 / 1e12:.0f} TFLOP/s fp16, "
               f"{e.hbm * g.hbm_bytes_per_s / 1e12:.2f} TB/s HBM; an allreduce runs its ring at "
               f"{e.link * g.interconnect_bytes_per_s / 1e9:.3g} GB/s and pays {inside * 1e6:.3g} us inside a node")
    if g.ib_bytes_per_s and g.ib_latency_s:
        ring = e.link * min(g.interconnect_bytes_per_s, g.gpus_per_node * g.ib_bytes_per_s)
        across = inside + g.ib_latency_s + e.internode_extra_latency_s
        meaning += f", {ring / 1e9:.3g} GB/s and {across * 1e6:.3g} us across nodes"
    out += ["", meaning]
    w = max([len("measurement")] + [len(r["quantity"]) for r in fit.residuals])
    out += ["", f"{'measurement':<{w}} {'measured':>10} {'model':>10} {'error':>8}"]
    for r in fit.residuals:
        out.append(f"{r['quantity']:<{w}} {r['measured']:>10,.5g} {r['model']:>10,.5g} {r['error']:>+8.1%}")
    out.append(f"loss {fit.loss:.4f} (sum of squared log errors), largest error {fit.max_abs_error:.1%}")
    return "\n".join(out)


def calibrate_gpu(gpu: str = DEFAULT_GPU, measurements: "str | Path | None" = None, write: bool = False,
                  log: Callable[[str], Any] = print) -> GPUFit:
    """Fit, print the per-measurement table, and (``write``) store the fit with its provenance."""
    fit = fit_gpu(gpu, measurements)
    log(fit_table(fit))
    if write:
        log(f"wrote {write_fit(fit)}")
    return fit


# ------------------------------------------------------------------------------ predictions
def gpu_inference_calibrated(config: Any, gpu: str | GPUSpec, num_gpus: int = 1, input_len: int | None = None,
                             output_len: int | None = None, batch: int = 1, dtype_bytes: int = 2,
                             fit: GPUFit | None = None) -> dict:
    """One request on ``num_gpus`` GPUs as a calibrated serving engine would run it.

    Same result keys as :func:`waferllm.hardware.gpu_roofline.gpu_inference_roofline`, with
    ``baseline = "calibrated"`` and ``provenance``: the GPU's constants, every efficiency
    factor with its source and status, what it was fitted to and the fit's residuals.
    """
    spec = gpu if isinstance(gpu, GPUSpec) else get_gpu(gpu)
    fit = fit or load_fit(spec)
    r = gpu_inference(config, spec, num_gpus, input_len, output_len, batch, dtype_bytes, fit.efficiency)
    return with_provenance(r, spec, "calibrated", "waferllm.baselines.gpu_calibrated: the roofline's terms with "
                           "fitted fractions of peak compute, HBM and link bandwidth, and fitted fixed costs per "
                           "allreduce, per layer and per forward pass", **fit.provenance_dict())


__all__ = [
    "DEFAULT_GPU", "DEFAULT_INPUT_LEN", "DEFAULT_OUTPUT_LEN", "FACTORS", "GPUFit", "Request", "calibrate_gpu",
    "fit_gpu", "fit_table", "fits_dir", "free_factors", "gpu_inference_calibrated", "load_fit",
    "measurement_request", "measurement_value", "measurements_to_toml", "model_value", "write_fit",
]
