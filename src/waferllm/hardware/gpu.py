"""GPU presets for the GPU baselines: data files with provenance, like the wafer presets.

A GPU is described by an editable TOML file (``hardware/gpus/<key>.toml``, or your own
file with ``base = "a100"``). Each constant is a bare value or a table
``{ value = ..., source = "...", status = "..." }`` with status one of measured, derived,
assumed, calibrated, user (vendor-published figures are ``measured``, as for the wafers).

Constants (per GPU): dense tensor-core peak FLOP/s by dtype (``peak_flops_fp16`` is
required, ``_bf16``, ``_fp8``, ``_fp4`` where the GPU has them), HBM bandwidth and
capacity, NVLink bandwidth per direction and the latency floor of one allreduce inside a
node, InfiniBand bandwidth per GPU per direction and the extra latency floor of a
collective that crosses nodes, GPUs per node, and board power. ``efficiency_from`` names
the preset whose serving-engine efficiency fit this GPU inherits when it has none of its
own (see :mod:`waferllm.baselines.gpu_calibrated`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from waferllm.errors import HardwareError
from waferllm.hardware.plmr import Provenance, read_constant

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore

#: Latency floor of one allreduce inside an NVLink node when a GPU description has none.
NVLINK_ALLREDUCE_LATENCY_S = 5e-6

#: file key -> (attribute, required, unit, meaning)
_KEYS: dict[str, tuple[str, bool, str, str]] = {
    "peak_flops_fp16": ("peak_flops_fp16", True, "FLOP/s", "dense fp16 tensor-core peak"),
    "peak_flops_bf16": ("peak_flops_bf16", False, "FLOP/s", "dense bf16 tensor-core peak"),
    "peak_flops_fp8": ("peak_flops_fp8", False, "FLOP/s", "dense fp8 tensor-core peak"),
    "peak_flops_fp4": ("peak_flops_fp4", False, "FLOP/s", "dense fp4 tensor-core peak"),
    "hbm_bytes_per_s": ("hbm_bytes_per_s", True, "B/s", "HBM bandwidth"),
    "hbm_capacity_bytes": ("hbm_capacity_bytes", True, "B", "HBM capacity"),
    "nvlink_bytes_per_s": ("interconnect_bytes_per_s", True, "B/s", "NVLink bandwidth per GPU, one direction"),
    "nvlink_latency_s": ("nvlink_latency_s", False, "s", "latency floor of one allreduce inside a node"),
    "ib_bytes_per_s": ("ib_bytes_per_s", False, "B/s", "InfiniBand bandwidth per GPU (its own NIC), one direction"),
    "ib_latency_s": ("ib_latency_s", False, "s", "extra latency floor of a collective that crosses nodes"),
    "gpus_per_node": ("gpus_per_node", False, "GPUs", "GPUs per node sharing NVLink/NVSwitch"),
    "power_w": ("power_w", True, "W", "board power while running"),
}
_ATTR_TO_KEY = {attr: key for key, (attr, _, _, _) in _KEYS.items()}
DTYPES = ("fp16", "bf16", "fp8", "fp4")


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_flops_fp16: float  # dense fp16 tensor-core FLOP/s
    hbm_bytes_per_s: float
    hbm_capacity_bytes: float
    power_w: float
    interconnect_bytes_per_s: float  # NVLink per GPU, one direction, for tensor parallelism
    source: str
    nvlink_latency_s: float = NVLINK_ALLREDUCE_LATENCY_S
    ib_bytes_per_s: float | None = None  # InfiniBand per GPU, one direction; None: single node only
    ib_latency_s: float | None = None
    gpus_per_node: int = 8
    peak_flops_bf16: float | None = None
    peak_flops_fp8: float | None = None
    peak_flops_fp4: float | None = None
    key: str = ""
    description: str = ""
    efficiency_from: str | None = None
    provenance: Mapping[str, Provenance] = field(default_factory=dict, compare=False)

    # ---- derived figures -------------------------------------------------
    def peak_flops(self, dtype: str = "fp16") -> float:
        """Dense tensor-core peak for ``dtype``; an error if the GPU has no such tensor cores."""
        if dtype not in DTYPES:
            raise HardwareError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        value = getattr(self, f"peak_flops_{dtype}")
        if value is None:
            raise HardwareError(f"{self.name} has no {dtype} tensor-core peak in its description")
        return value

    def nodes(self, num_gpus: int) -> int:
        """Nodes a tensor-parallel group of ``num_gpus`` spans (whole nodes beyond one)."""
        g = self.gpus_per_node
        if num_gpus <= g:
            return 1
        if num_gpus % g:
            raise HardwareError(f"{num_gpus} GPUs do not fill whole nodes of {g} {self.name}; use at most {g} "
                                f"or a multiple of {g}")
        if self.ib_bytes_per_s is None or self.ib_latency_s is None:
            raise HardwareError(f"{self.name} has no InfiniBand figures (ib_bytes_per_s, ib_latency_s): "
                                f"{num_gpus} GPUs would cross nodes")
        return num_gpus // g

    def roofline_seconds(self, flops: float, bytes_moved: float, count: int = 1) -> float:
        """Time of one op on ``count`` GPUs splitting flops and bytes evenly (no overlap loss)."""
        return max(flops / (self.peak_flops_fp16 * count), bytes_moved / (self.hbm_bytes_per_s * count))

    # ---- provenance ------------------------------------------------------
    def source_of(self, name: str) -> Provenance:
        """Provenance of a constant, by file key (``nvlink_bytes_per_s``) or attribute name."""
        key = _ATTR_TO_KEY.get(name, name)
        return self.provenance.get(key, Provenance(self.source or "unspecified", "assumed"))

    def constants(self) -> dict[str, dict]:
        """Every constant this GPU has, by file key, with its value, source and status."""
        out = {}
        for key, (attr, _, unit, meaning) in _KEYS.items():
            value = getattr(self, attr)
            if value is not None:
                out[key] = {"value": value, "unit": unit, **self.source_of(key).to_dict()}
        return out

    def to_dict(self) -> dict:
        return {"key": self.key, "name": self.name, "description": self.description,
                "efficiency_from": self.efficiency_from, "constants": self.constants()}

    def replace(self, **changes: Any) -> "GPUSpec":
        """A copy with some constants changed (file keys or attribute names); they are marked ``user``."""
        prov = dict(self.provenance)
        values = {}
        for name, value in changes.items():
            key = _ATTR_TO_KEY.get(name, name)
            if key not in _KEYS:
                raise HardwareError(f"unknown GPU constant {name!r}; known: {', '.join(_KEYS)}")
            values[_KEYS[key][0]] = _coerce(key, value, "override")
            prov[key] = Provenance("command-line/API override", "user")
        return dataclasses.replace(self, provenance=prov, **values)


# ------------------------------------------------------------------------------ loading
def _coerce(key: str, value: Any, where: str):
    if isinstance(value, bool):
        raise HardwareError(f"{where}: {key} must be a number, got {value!r}")
    try:
        v = int(value) if key == "gpus_per_node" else float(value)
    except (TypeError, ValueError):
        raise HardwareError(f"{where}: {key} must be a number, got {value!r}") from None
    if key == "gpus_per_node" and float(value) != v:
        raise HardwareError(f"{where}: gpus_per_node must be a whole number, got {value!r}")
    if not math.isfinite(v) or v <= 0:
        raise HardwareError(f"{where}: {key} ({_KEYS[key][3]}, {_KEYS[key][2]}) must be positive, got {value!r}")
    return v


def from_mapping(data: Mapping[str, Any], where: str = "<mapping>", base: GPUSpec | None = None,
                 key: str = "") -> GPUSpec:
    """A GPU from a parsed TOML/JSON table; with ``base`` (or ``base = "a100"``) it only overrides it."""
    if not isinstance(data, Mapping):
        raise HardwareError(f"{where}: expected a table of GPU constants")
    data = dict(data)
    if "base" in data:
        base_name = str(data.pop("base"))
        base = base or get_gpu(base_name)
    meta = {"name", "description", "aliases", "efficiency_from", "source"}
    unknown = set(data) - set(_KEYS) - meta
    if unknown:
        raise HardwareError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known keys: base, "
                            f"{', '.join(sorted(meta))}, {', '.join(_KEYS)}")
    values: dict[str, Any] = {}
    prov: dict[str, Provenance] = dict(base.provenance) if base else {}
    for k, (attr, required, unit, meaning) in _KEYS.items():
        if k not in data:
            if base is not None:
                values[attr] = getattr(base, attr)
            elif required:
                raise HardwareError(f"{where}: missing required key {k!r} ({meaning}, {unit})")
            continue
        raw, prov[k] = read_constant(k, data[k], where, _coerce)
        values[attr] = _coerce(k, raw, where)
    name = str(data.get("name", base.name if base else (key or Path(where).stem)))
    spec = GPUSpec(
        name=name,
        source=str(data.get("source", base.source if base else f"{where}: see each constant's provenance")),
        key=key or (base.key if base else name.lower()),
        description=str(data.get("description", base.description if base else "")),
        efficiency_from=data.get("efficiency_from", base.efficiency_from if base else None),
        provenance=prov,
        **values,
    )
    return spec


def _preset_dir():
    return resources.files("waferllm.hardware") / "gpus"


def _load_presets() -> tuple[dict[str, GPUSpec], dict[str, str]]:
    specs, aliases = {}, {}
    for entry in sorted(_preset_dir().iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".toml"):
            continue
        k = entry.name[:-5]
        try:
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise HardwareError(f"GPU preset {k}: not valid TOML: {exc}") from None
        names = [k, *[str(a) for a in data.get("aliases", [])], str(data.get("name", k))]
        spec = from_mapping(data, where=f"GPU preset {k}", key=k)
        summary = "; ".join(f"{key} {spec.source_of(key).source}" for key in ("peak_flops_fp16", "hbm_bytes_per_s"))
        specs[k] = dataclasses.replace(spec, source=f"{spec.description}. {summary}")
        for n in names:
            aliases[_norm(n)] = k
    order = sorted(specs, key=lambda k: (specs[k].peak_flops_fp16, specs[k].hbm_bytes_per_s))  # by generation
    return {k: specs[k] for k in order}, aliases


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "").replace("_", "-")


GPUS, _ALIASES = _load_presets()


def gpu_preset_names() -> list[str]:
    return list(GPUS)


def load_gpu_file(path: str | Path) -> GPUSpec:
    path = Path(path)
    if not path.is_file():
        raise HardwareError(f"GPU file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8", errors="replace"))
    except tomllib.TOMLDecodeError as exc:
        raise HardwareError(f"{path}: not valid TOML: {exc}") from None
    return from_mapping(data, where=str(path), key=path.stem)


def get_gpu(name: "str | Path | GPUSpec", **overrides: Any) -> GPUSpec:
    """A GPU preset by name or alias (``a100``, ``A100-80GB``, ``h100``, ``H100-SXM``, ``h200``,
    ``b200``), or a TOML file (optionally ``base = "a100"``), with optional overrides."""
    if isinstance(name, GPUSpec):
        spec = name
    else:
        key = _ALIASES.get(_norm(str(name)))
        if key is not None:
            spec = GPUS[key]
        elif str(name).endswith(".toml") or Path(str(name)).is_file():
            spec = load_gpu_file(name)
        else:
            raise HardwareError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (or a TOML file)")
    return spec.replace(**overrides) if overrides else spec
