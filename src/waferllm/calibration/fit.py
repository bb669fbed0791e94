"""Fit a wafer preset's free constants to its measurements, absolute measurements first.

The loss is, in log space,

    ABSOLUTE_WEIGHT * sum(absolute residuals^2) + sum(claim residuals^2) + PRIOR_WEIGHT * sum(prior^2)

so that a measured number always outweighs the authors' summaries of plots (claims only
break ties among constants the measurements leave free), and a weak prior towards
plausible values keeps the constants that no target constrains from drifting. Each
preset has its own plan: which constants are free, and which are taken from another
preset (``derived``) because the same runtime software runs on both chips.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from waferllm.hardware.measurements import Measurement, load_measurements
from waferllm.calibration.targets import Evaluator
from waferllm.hardware.plmr import WaferSpec, get_wafer

ABSOLUTE_WEIGHT = 100.0
PRIOR_WEIGHT = 0.01


@dataclass(frozen=True)
class FitPlan:
    """What a preset's fit may change."""

    wafer: str
    free: dict[str, float]  # constant -> prior (a plausible value, the fit's start)
    lanes: tuple[float, ...] = ()  # candidate fp16 SIMD widths (discrete), empty: keep
    derived: dict[str, tuple[str, str]] = field(default_factory=dict)  # constant -> (other preset, why)


PLANS = {
    # SPEC 1: beta "tens of cycles is plausible"; the other priors are round guesses
    "wse2": FitPlan(
        "wse2",
        free={"beta_cycles": 30.0, "op_overhead_cycles": 20.0, "step_overhead_cycles": 20.0,
              "collective_overhead_cycles": 50.0, "task_switch_cycles": 50.0},
        lanes=(2.0, 4.0, 8.0),
    ),
    "wse3": FitPlan(
        "wse3",
        free={"collective_overhead_cycles": 500.0, "task_switch_cycles": 100.0, "op_overhead_cycles": 50.0},
        derived={"beta_cycles": ("wse2", "the WSE-2 fit (same fabric and runtime software)"),
                 "step_overhead_cycles": ("wse2", "the WSE-2 fit (same fabric and runtime software)")},
    ),
}


@dataclass
class Row:
    measurement: Measurement
    value: float

    @property
    def residual(self) -> float:
        return self.measurement.residual(self.value)

    @property
    def passes(self) -> bool:
        return self.measurement.passes(self.value)


def evaluate(wafer: WaferSpec, measurements: list[Measurement] | None = None) -> list[Row]:
    ms = measurements if measurements is not None else load_measurements(system=wafer.name)
    ev = Evaluator(wafer)
    return [Row(m, ev.value(m)) for m in ms]


def target_loss(rows: list[Row]) -> float:
    """The measurement part of the loss (what a preset's provenance records)."""
    return float(sum((ABSOLUTE_WEIGHT if r.measurement.absolute else 1.0) * r.residual ** 2 for r in rows))


def _prior_loss(values: dict[str, float], plan: FitPlan) -> float:
    return PRIOR_WEIGHT * sum(math.log(max(values[k], 1e-3) / p) ** 2 for k, p in plan.free.items())


def nelder_mead(f, x0, step, iters=80, tol=1e-6):
    """Minimise f over R^n (a small, dependency-free Nelder-Mead)."""
    n = len(x0)
    pts = [np.asarray(x0, float)] + [np.asarray(x0, float) + np.eye(n)[i] * step for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) < tol:
            break
        centroid = np.mean(pts[:-1], axis=0)
        xr = centroid + (centroid - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centroid + 2 * (centroid - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (pts[-1] - centroid)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    i = int(np.argmin(vals))
    return pts[i], vals[i]


def with_derived(wafer: WaferSpec, plan: FitPlan, others: dict[str, WaferSpec]) -> WaferSpec:
    """The preset with its derived constants taken from the other presets."""
    vals = {k: getattr(others[src], k) for k, (src, _) in plan.derived.items()}
    return wafer.replace(**vals) if vals else wafer


def fit(wafer: WaferSpec, plan: FitPlan, iters: int = 80, log=print,
        measurements: list[Measurement] | None = None, on_eval=None) -> tuple[dict[str, float], float]:
    """Best free constants (and fp16 width) for ``wafer``; returns (values, target loss)."""
    ms = measurements if measurements is not None else load_measurements(system=plan.wafer)
    keys = list(plan.free)
    best = None
    for lane in plan.lanes or (None,):
        base = wafer if lane is None else wafer.replace(fp16_macs_per_cycle=lane)

        def f(z, base=base):
            if on_eval is not None:  # progress: one evaluation of every measurement
                on_eval()
            vals = dict(zip(keys, np.exp(z)))
            return target_loss(evaluate(base.replace(**vals), ms)) + _prior_loss(vals, plan)

        z, val = nelder_mead(f, np.log([plan.free[k] for k in keys]), step=0.7, iters=iters)
        vals = {k: round(float(v), 1) for k, v in zip(keys, np.exp(z))}
        if lane is not None:
            vals["fp16_macs_per_cycle"] = lane
        tl = target_loss(evaluate(wafer.replace(**vals), ms))
        log(f"  {plan.wafer}" + (f" fp16 lanes {lane:g}" if lane else "") + f": loss {tl:.4f} at "
            + ", ".join(f"{k}={v:g}" for k, v in vals.items()))
        if best is None or val < best[1]:
            best = (vals, val, tl)
    return best[0], best[2]


# ---------------------------------------------------------------------------- presets


def preset_path(name: str) -> Path:
    return Path(str(resources.files("waferllm.hardware") / "presets" / f"{name}.toml"))


def write_constant(path: Path, key: str, value, source: str, status: str, rng=None) -> None:
    text = path.read_text()
    extra = f", range = [{rng[0]}, {rng[1]}]" if rng else ""
    line = f'{key} = {{ value = {value}, source = "{source}", status = "{status}"{extra} }}'
    text, n = re.subn(rf"^{key} = .*$", line.replace("\\", "\\\\"), text, flags=re.M)
    if n != 1:
        raise SystemExit(f"could not find {key} in {path}")
    path.write_text(text)


LOSS_RE = re.compile(r"loss ([0-9.]+)")


def write_fit(name: str, values: dict[str, float], loss: float, rows: list[Row], plan: FitPlan,
              others: dict[str, WaferSpec]) -> None:
    """Store a preset's fitted and derived constants with their provenance."""
    path = preset_path(name)
    stamp = time.strftime("%Y-%m-%d")
    worst = max((abs(r.measurement.error(r.value)) for r in rows if r.measurement.absolute), default=0.0)
    summary = (f"fitted by `waferllm calibrate` to the {name} measurements of SPEC section 5 (absolute measurements "
               f"first), loss {loss:.4f}, largest error on a measurement {worst:.1%}, {stamp}")
    for key, value in values.items():
        write_constant(path, key, value, summary, "calibrated")
    write_constant(path, "calibration_error", round(worst, 4),
                   f"largest relative error on the {name} absolute measurements after the fit of {stamp}", "calibrated")
    for key, (src, why) in plan.derived.items():
        write_constant(path, key, getattr(others[src], key), f"{why}: {src} value, {stamp}", "derived")


def recorded_loss(wafer: WaferSpec) -> float | None:
    """The loss a preset's provenance says its calibrated constants give."""
    for key in _fitted_keys(wafer):
        m = LOSS_RE.search(wafer.source_of(key).source)
        if m:
            return float(m.group(1))
    return None


def _fitted_keys(wafer: WaferSpec) -> list[str]:
    return [k for k, p in wafer.provenance.items() if p.status == "calibrated" and k != "calibration_error"]


def calibrate(names=("wse2", "wse3"), iters: int = 80, write: bool = False, log=print, on_eval=None) -> dict:
    """Fit the presets in order (wse2 before wse3, whose derived constants come from it)."""
    current = {n: get_wafer(n) for n in PLANS}
    results = {}
    for name in [n for n in PLANS if n in names]:
        plan = PLANS[name]
        base = with_derived(current[name], plan, current)
        log(f"fitting {name}")
        values, _ = fit(base, plan, iters=iters, log=log, on_eval=on_eval)
        current[name] = base.replace(**values)
        rows = evaluate(current[name])
        results[name] = {"values": values, "loss": target_loss(rows), "rows": rows}
        if write:
            write_fit(name, values, target_loss(rows), rows, plan, current)
            log(f"wrote {', '.join(values)}" + (f" and {', '.join(plan.derived)}" if plan.derived else "")
                + f" to {preset_path(name)}")
    return results
