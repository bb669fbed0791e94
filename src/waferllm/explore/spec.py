"""A sweep specification: which predictions to make, as data.

A spec is a TOML file (or the same mapping in Python) with four tables::

    [sweep]
    method = "grid"          # "grid": every combination of the axes; "random": `samples` draws
    samples = 32             # random only
    seed = 0                 # random only
    batch = 4                # points per Ray task (default: chosen from the point count)

    [fixed]                  # one value for every point
    model = "llama3-8b"      # a preset or a model path (a directory with config.json, a config file, a GGUF),
                             # relative to the spec's folder
    input_len = 2048
    decode_grid = 360

    [axes]                   # the swept inputs
    sram_bytes_per_pe = [24576, 49152, 98304]          # a list: these values
    beta_cycles = { low = 1, high = 80, num = 7, log = true }   # a range: num values (grid) or draws (random)

    [plot]                   # optional: what `sweep --plot` draws
    pareto = ["energy_j", "decode_tokens_per_s"]
    y = ["decode_tokens_per_s", "kv_capacity_tokens"]

An input is a run setting (``model``, ``wafer``, ``input_len``, ``output_len``,
``prefill_grid``, ``decode_grid`` (an integer or ``"auto"``: tuned), ``dtype``,
``kv_scheme``, ``layers`` (place and run that many layers, scale to the whole model),
``band``, ``gpus``, ``allow_beyond_context``, ``weights`` (fp16, int8, int4), ``defect_rate``
with ``defect_seed`` and ``defect_recovery``) or any wafer constant (the ``--set`` keys of
``waferllm hardware``). ``wafers`` is part of the format but only 1 is accepted: a sweep
predicts one wafer (``waferllm predict --wafers`` plans clusters).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from waferllm.errors import WaferLLMError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore


class SweepError(WaferLLMError):
    """A sweep specification that cannot be run, or a sweep that could not finish."""


#: run settings a point may set: name -> (kind, default)
RUN_KEYS: dict[str, tuple[str, Any]] = {
    "model": ("str", "llama3-8b"),
    "wafer": ("str", "wse2"),
    "input_len": ("int", 2048),
    "output_len": ("int", 128),
    "prefill_grid": ("grid", "auto"),
    "decode_grid": ("grid", "auto"),
    "dtype": ("str", "fp16"),
    "kv_scheme": ("str", "shift"),
    "layers": ("int?", None),
    "band": ("bool", False),
    "gpus": ("bool", False),
    "allow_beyond_context": ("bool", False),
    "weights": ("str", "fp16"),
    "defect_rate": ("float", 0.0),
    "defect_seed": ("int", 0),
    "defect_recovery": ("str", "spare"),
}

#: inputs the format knows but the engine does not model yet: name -> (neutral value, why refused)
NOT_MODELLED: dict[str, tuple[Any, str]] = {
    "wafers": (1, "a sweep predicts one wafer; `waferllm predict --wafers auto|N` plans and predicts clusters"),
}

METHODS = ("grid", "random")
_TABLES = ("sweep", "fixed", "axes", "plot")
_SWEEP_KEYS = ("name", "method", "samples", "seed", "batch")
_PLOT_KEYS = ("pareto", "y")


def wafer_keys() -> dict[str, str]:
    """The wafer constants a point may set: name -> ``int`` or ``float``."""
    from waferllm.hardware import WaferSpec

    out = {}
    for f in dataclasses.fields(WaferSpec):
        if f.name in ("name", "description", "defective_pes", "provenance"):
            continue
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "float")
        out[f.name] = "int" if typ == "int" else "float"
    return out


def input_keys() -> list[str]:
    return list(RUN_KEYS) + list(wafer_keys()) + list(NOT_MODELLED)


def _kind(key: str) -> str:
    if key in RUN_KEYS:
        return RUN_KEYS[key][0]
    if key in NOT_MODELLED:
        return "float"
    return wafer_keys()[key]


def _check_value(key: str, value: Any, where: str) -> Any:
    """``value`` as the type ``key`` takes, or a SweepError naming the key."""
    kind = _kind(key)
    if kind == "bool":
        if not isinstance(value, bool):
            raise SweepError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise SweepError(f"{where}: {key} must be a non-empty string, got {value!r}")
        return value
    if kind == "grid" and isinstance(value, str):
        if value != "auto":
            raise SweepError(f"{where}: {key} must be a positive integer or \"auto\", got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SweepError(f"{where}: {key} must be a number, got {value!r}")
    if kind in ("int", "int?", "grid"):
        if value != int(value):
            raise SweepError(f"{where}: {key} must be a whole number, got {value!r}")
        return int(value)
    if key == "defect_rate" and not 0 <= value < 1:
        raise SweepError(f"{where}: defect_rate is the fraction of defective PEs, 0 <= rate < 1; got {value!r}")
    return float(value)


def _neutral(key: str, value: Any, where: str) -> None:
    neutral, why = NOT_MODELLED[key]
    if value != neutral:
        raise SweepError(f"{where}: {key} = {value!r} cannot be predicted yet: {why}; only {key} = {neutral!r} "
                         "is accepted")


@dataclass(frozen=True)
class Axis:
    """One swept input: a list of values, or a range (``low``..``high``, ``num`` values or random draws)."""

    key: str
    values: tuple = ()
    low: float | None = None
    high: float | None = None
    num: int | None = None
    log: bool = False

    def grid_values(self) -> list:
        if self.values:
            return list(self.values)
        if self.num is None:
            raise SweepError(f"axes.{self.key}: a range needs num (how many values) in a grid sweep")
        if self.num == 1:
            return [self._cast(self.low)]
        if self.log:
            lo, hi = math.log(self.low), math.log(self.high)
            raw = [math.exp(lo + (hi - lo) * i / (self.num - 1)) for i in range(self.num)]
        else:
            raw = [self.low + (self.high - self.low) * i / (self.num - 1) for i in range(self.num)]
        out = []
        for v in raw:
            c = self._cast(v)
            if c not in out:
                out.append(c)
        return out

    def draw(self, rng: random.Random):
        if self.values:
            return rng.choice(self.values)
        if self.log:
            return self._cast(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return self._cast(rng.uniform(self.low, self.high))

    def _cast(self, v: float):
        return int(round(v)) if _kind(self.key) in ("int", "int?", "grid") else float(v)


def _axis(key: str, raw: Any, where: str) -> Axis:
    if isinstance(raw, list):
        if not raw:
            raise SweepError(f"{where}: axes.{key} is an empty list")
        values = tuple(_check_value(key, v, f"{where}: axes.{key}") for v in raw)
        if key in NOT_MODELLED:
            for v in values:
                _neutral(key, v, where)
        return Axis(key, values=values)
    if isinstance(raw, Mapping):
        unknown = set(raw) - {"low", "high", "num", "log"}
        if unknown:
            raise SweepError(f"{where}: axes.{key} has unknown key(s) {', '.join(sorted(unknown))}; "
                             "a range is { low, high, num, log }")
        if _kind(key) not in ("int", "int?", "grid", "float"):
            raise SweepError(f"{where}: axes.{key} takes a list of values, not a range")
        if "low" not in raw or "high" not in raw:
            raise SweepError(f"{where}: axes.{key} needs low and high")
        lo = _check_value(key, raw["low"], f"{where}: axes.{key}.low")
        hi = _check_value(key, raw["high"], f"{where}: axes.{key}.high")
        if isinstance(lo, str) or isinstance(hi, str):
            raise SweepError(f"{where}: axes.{key}: a range takes numbers")
        if lo > hi:
            raise SweepError(f"{where}: axes.{key}: low ({lo}) is above high ({hi})")
        num = raw.get("num")
        if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
            raise SweepError(f"{where}: axes.{key}.num must be a positive integer, got {num!r}")
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise SweepError(f"{where}: axes.{key}.log must be true or false, got {log!r}")
        if log and lo <= 0:
            raise SweepError(f"{where}: axes.{key}: a log range needs low > 0, got {lo}")
        if key in NOT_MODELLED:
            _neutral(key, lo, where)
            _neutral(key, hi, where)
        return Axis(key, low=float(lo), high=float(hi), num=num, log=log)
    # a bare value on an axis is one value
    return Axis(key, values=(_check_value(key, raw, f"{where}: axes.{key}"),))


@dataclass
class SweepSpec:
    """What to predict: the fixed inputs, the axes, how to draw points, what to plot."""

    fixed: dict = field(default_factory=dict)
    axes: list[Axis] = field(default_factory=list)
    method: str = "grid"
    samples: int | None = None
    seed: int = 0
    batch: int | None = None
    name: str = "sweep"
    pareto: tuple[str, str] = ("energy_j", "decode_tokens_per_s")
    y: tuple[str, ...] = ()
    base_dir: str = "."

    @property
    def swept(self) -> list[str]:
        """The inputs that take more than one value."""
        return [a.key for a in self.axes if len(a.values) != 1]

    def points(self) -> list[dict]:
        """Every point of the sweep: a dict with every input (defaults filled in), in a stable order."""
        base = {k: d for k, (_, d) in RUN_KEYS.items()}
        base.update(self.fixed)
        out, seen = [], set()

        def add(values: Mapping[str, Any]):
            p = dict(base)
            p.update(values)
            p = self._resolve_paths(p)
            pid = point_id(p)
            if pid not in seen:
                seen.add(pid)
                out.append(p)

        if self.method == "grid":
            lists = [a.grid_values() for a in self.axes]
            for combo in itertools.product(*lists):
                add(dict(zip([a.key for a in self.axes], combo)))
        else:
            rng = random.Random(self.seed)
            tries = 0
            while len(out) < self.samples and tries < 50 * self.samples:
                tries += 1
                add({a.key: a.draw(rng) for a in self.axes})
        return out

    def _resolve_paths(self, p: dict) -> dict:
        """Model and wafer paths that exist relative to the spec file's folder are taken from there;
        anything else (preset names, absolute paths) is left as written."""
        for key in ("model", "wafer"):
            v = p.get(key)
            if isinstance(v, str) and not os.path.isabs(v):
                cand = os.path.normpath(os.path.join(self.base_dir, v))
                if self.base_dir not in ("", ".") and os.path.exists(cand):
                    p[key] = cand
        return p


def point_id(point: Mapping[str, Any]) -> str:
    """A short stable id of a point's inputs (what a rerun matches finished rows by)."""
    text = json.dumps({k: point[k] for k in sorted(point)}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def spec_from_mapping(data: Mapping[str, Any], where: str = "<sweep spec>", base_dir: str = ".") -> SweepSpec:
    """Check a parsed spec and build a :class:`SweepSpec`; every mistake is a :class:`SweepError`."""
    if not isinstance(data, Mapping):
        raise SweepError(f"{where}: expected a table with [sweep], [fixed], [axes] and [plot]")
    unknown = set(data) - set(_TABLES)
    if unknown:
        raise SweepError(f"{where}: unknown table(s) {', '.join(sorted(unknown))}; a spec has "
                         f"{', '.join('[' + t + ']' for t in _TABLES)}")
    for t in _TABLES:
        if t in data and not isinstance(data[t], Mapping):
            raise SweepError(f"{where}: [{t}] must be a table")
    head = dict(data.get("sweep", {}))
    bad = set(head) - set(_SWEEP_KEYS)
    if bad:
        raise SweepError(f"{where}: unknown key(s) in [sweep]: {', '.join(sorted(bad))}; known: {', '.join(_SWEEP_KEYS)}")
    known = input_keys()
    fixed_raw, axes_raw = dict(data.get("fixed", {})), dict(data.get("axes", {}))
    for table, d in (("fixed", fixed_raw), ("axes", axes_raw)):
        bad = [k for k in d if k not in known]
        if bad:
            raise SweepError(f"{where}: unknown input(s) in [{table}]: {', '.join(sorted(bad))}; an input is one of: "
                             f"{', '.join(known)}")
    both = sorted(set(fixed_raw) & set(axes_raw))
    if both:
        raise SweepError(f"{where}: {', '.join(both)} both fixed and swept; keep each input in one table")
    fixed = {}
    for k, v in fixed_raw.items():
        if isinstance(v, (list, Mapping)):
            raise SweepError(f"{where}: fixed.{k} must be one value (put a list under [axes] to sweep it)")
        fixed[k] = _check_value(k, v, f"{where}: fixed.{k}")
        if k in NOT_MODELLED:
            _neutral(k, fixed[k], where)
    axes = [_axis(k, v, where) for k, v in axes_raw.items()]
    method = head.get("method", "grid")
    if method not in METHODS:
        raise SweepError(f"{where}: sweep.method must be one of {', '.join(METHODS)}, got {method!r}")
    samples = head.get("samples")
    if method == "random":
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise SweepError(f"{where}: a random sweep needs sweep.samples, a positive integer (got {samples!r})")
    elif samples is not None:
        raise SweepError(f"{where}: sweep.samples applies to method = \"random\" only")
    seed = head.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SweepError(f"{where}: sweep.seed must be an integer, got {seed!r}")
    batch = head.get("batch")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise SweepError(f"{where}: sweep.batch must be a positive integer, got {batch!r}")
    name = head.get("name", Path(where).stem if where.endswith(".toml") else "sweep")
    plot = dict(data.get("plot", {}))
    bad = set(plot) - set(_PLOT_KEYS)
    if bad:
        raise SweepError(f"{where}: unknown key(s) in [plot]: {', '.join(sorted(bad))}; known: {', '.join(_PLOT_KEYS)}")
    pareto = plot.get("pareto", ["energy_j", "decode_tokens_per_s"])
    if not (isinstance(pareto, list) and len(pareto) == 2 and all(isinstance(x, str) and x for x in pareto)):
        raise SweepError(f"{where}: plot.pareto must name two figures, e.g. [\"energy_j\", \"decode_tokens_per_s\"]")
    y = plot.get("y", [])
    if not (isinstance(y, list) and all(isinstance(x, str) and x for x in y)):
        raise SweepError(f"{where}: plot.y must be a list of figure names")
    spec = SweepSpec(fixed=fixed, axes=axes, method=method, samples=samples, seed=seed, batch=batch,
                     name=str(name), pareto=(pareto[0], pareto[1]), y=tuple(y), base_dir=base_dir)
    if method == "grid":
        for a in axes:
            a.grid_values()  # a range without num is refused here, before anything runs
    elif any(a.num is not None for a in axes):
        raise SweepError(f"{where}: axes' num applies to a grid sweep; a random sweep draws sweep.samples points")
    return spec


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read a spec from a TOML (or JSON) file; relative model and wafer paths are taken from its folder."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep spec not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise SweepError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {exc}") from None
    return spec_from_mapping(data, where=str(path), base_dir=str(path.parent))


def as_spec(spec: "SweepSpec | Mapping | str | os.PathLike") -> SweepSpec:
    if isinstance(spec, SweepSpec):
        return spec
    if isinstance(spec, Mapping):
        return spec_from_mapping(spec)
    if isinstance(spec, (str, os.PathLike)):
        return load_spec(spec)
    raise SweepError(f"a sweep spec is a SweepSpec, a mapping or a file path, got {type(spec).__name__}")
