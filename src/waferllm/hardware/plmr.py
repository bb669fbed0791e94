"""PLMR description of a wafer-scale accelerator.

A wafer is data: an editable TOML or JSON file. Every constant carries where it came
from (``source``) and how much to trust it (``status``: measured, derived, assumed,
calibrated or user). Presets live in ``hardware/presets/*.toml``.

In a file, a constant is either a bare value (``beta_cycles = 40``) or a table
``{ value = 40, source = "...", status = "calibrated" }``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from waferllm.errors import HardwareError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore

STATUSES = ("measured", "derived", "assumed", "calibrated", "user")


@dataclass(frozen=True)
class Provenance:
    source: str
    status: str
    # (low, high): the values an uncertain constant could plausibly take; predictions
    # report the band they span (see waferllm.engine.band)
    range: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        out = {"source": self.source, "status": self.status}
        if self.range is not None:
            out["range"] = list(self.range)
        return out


# name -> (type, must be > 0, unit, meaning)
_FIELDS: dict[str, tuple[type, bool, str, str]] = {
    "rows": (int, True, "PEs", "usable mesh rows (y)"),
    "cols": (int, True, "PEs", "usable mesh columns (x)"),
    "clock_hz": (float, True, "Hz", "core and fabric clock"),
    "sram_bytes_per_pe": (int, True, "B", "local SRAM per PE"),
    "reserved_bytes_per_pe": (int, False, "B", "SRAM per PE kept for code, stack and runtime buffers"),
    "link_bits_per_cycle": (int, True, "bit/cycle", "bandwidth of one link, each direction"),
    "alpha_cycles": (float, False, "cycles", "per-hop latency on a configured route"),
    "ramp_cycles": (float, False, "cycles", "PE <-> router latency, each way"),
    "beta_cycles": (float, False, "cycles", "software relay (routing stage) cost"),
    "routable_routes_per_pe": (int, True, "routes", "static routes (colors) a PE's router can hold"),
    "fp32_macs_per_cycle": (float, True, "MAC/cycle", "fp32 multiply-accumulates per PE per cycle"),
    "fp16_macs_per_cycle": (float, True, "MAC/cycle", "fp16 multiply-accumulates per PE per cycle (SIMD lanes)"),
    "op_overhead_cycles": (float, False, "cycles", "fixed cost of launching one compute op on a PE"),
    "step_overhead_cycles": (float, False, "cycles", "fixed cost of one synchronised algorithm step (the barrier between steps)"),
    "collective_overhead_cycles": (float, False, "cycles",
                                   "fixed cost of one collective (reduce, allreduce, broadcast) on top of its messages: "
                                   "setting up its routes (colors) and activating its receive tasks"),
    "task_switch_cycles": (float, False, "cycles",
                           "fixed cost of switching a PE to its next task (one per op or collective), paid outside "
                           "the op's own time"),
    "calibration_error": (float, False, "fraction",
                          "largest relative error of the cost model on this wafer's absolute measurements after its "
                          "fit (0: never measured); it widens every predicted band"),
    "ops_exp": (float, True, "ops/elem", "SIMD ops per element of exp (no transcendental unit)"),
    "ops_silu": (float, True, "ops/elem", "SIMD ops per element of SiLU(g) * u"),
    "ops_rmsnorm_scale": (float, True, "ops/elem", "SIMD ops per element of RMSNorm's x * rsqrt(mean) * w"),
    "ops_rope": (float, True, "ops/elem", "SIMD ops per element of RoPE with per-token cos/sin tables"),
    "ops_div": (float, True, "ops/elem", "SIMD ops per element of a division"),
    "ops_dequant_int8": (float, True, "ops/elem",
                         "SIMD ops per weight element to turn a stored int8 value of a 32-value block with an fp16 "
                         "scale (GGUF Q8_0) into an operand of the compute dtype (no integer datapath)"),
    "ops_dequant_int4": (float, True, "ops/elem",
                         "SIMD ops per weight element to turn a stored 4-bit value of a 32-value block with an fp16 "
                         "scale (GGUF Q4_0) into an operand of the compute dtype (no int4 datapath)"),
    "spare_rows": (int, False, "rows",
                   "physical PE rows beyond the usable rectangle that the hardware maps in for rows it retires "
                   "(defect recovery 'spare')"),
    "spare_cols": (int, False, "PEs",
                   "spare PEs at the end of every physical row: the hardware skips up to this many defective PEs "
                   "in a row (defect recovery 'spare')"),
    "power_w": (float, True, "W", "whole-system power while running: a cross-check (power x time), not the energy"),
    "mac_energy_fp16_pj": (float, False, "pJ/MAC",
                           "energy of one fp16 multiply-accumulate (fp16 product, fp32 accumulation) in a PE's "
                           "datapath; a vector op of one flop counts as half a MAC"),
    "mac_energy_fp32_pj": (float, False, "pJ/MAC",
                           "energy of one fp32 multiply-accumulate in a PE's datapath; a vector op of one flop "
                           "counts as half a MAC"),
    "sram_read_energy_pj_per_byte": (float, False, "pJ/B", "energy to read one byte from a PE's local SRAM"),
    "sram_write_energy_pj_per_byte": (float, False, "pJ/B", "energy to write one byte into a PE's local SRAM"),
    "fabric_energy_pj_per_bit_hop": (float, False, "pJ/(bit hop)",
                                     "energy to move one bit one hop on the fabric: a router traversal plus the wire "
                                     "to the neighbouring PE"),
    "static_power_w": (float, False, "W",
                       "static power of the whole system while a program runs, busy or not: wafer leakage plus "
                       "always-on load (cooling, power conversion, I/O); charged for the critical-path time"),
}

DTYPE_BYTES = {"fp16": 2, "fp32": 4}

#: How a wafer copes with its defective PEs (``defect_recovery``): ``avoid`` places regions
#: on squares without one (the PEs listed are in the usable rectangle); ``spare``: the
#: hardware remaps spare rows and columns so programs see a perfect rectangle; ``reroute``:
#: fault-aware placement in software, regions skipping the defective PEs (into the spare
#: columns as needed) and messages detouring around them. For both, the PEs listed are on
#: the physical fabric, rows + spare_rows by cols + spare_cols (see :mod:`waferllm.hardware.defects`).
DEFECT_RECOVERY = ("avoid", "spare", "reroute")

#: Constants added after wafer files were first written: a file with no ``base`` that
#: lacks one gets this value (with its provenance) instead of an error.
_DEFAULTS: dict[str, tuple[float, Provenance]] = {
    "ops_dequant_int8": (2.0, Provenance("default for a wafer file without it: convert the int8 value, multiply by "
                                         "its block's scale (assumption)", "assumed", (1.0, 3.0))),
    "ops_dequant_int4": (4.0, Provenance("default for a wafer file without it: extract the nibble (shift, mask), "
                                         "convert, multiply by its block's scale less the offset (assumption)",
                                         "assumed", (2.0, 6.0))),
    "spare_rows": (0, Provenance("default for a wafer file without it: no spare rows", "assumed")),
    "spare_cols": (0, Provenance("default for a wafer file without it: no spare PEs in a row", "assumed")),
}

#: Sanity bounds on every constant, so that no value a file or ``--set`` gives can make a
#: prediction overflow to inf or run for ever. A mesh side above MAX_MESH_SIDE is more than
#: any wafer (a 300 mm wafer holds about 1,200 PEs per side at the WSE pitch); a constant
#: above MAX_VALUE or a positive one below MIN_POSITIVE is a unit mistake.
MAX_MESH_SIDE = 2048
MAX_VALUE = 1e15
MIN_POSITIVE = 1e-6


@dataclass(frozen=True)
class WaferSpec:
    """A wafer-scale accelerator described by its PLMR constants."""

    name: str
    rows: int
    cols: int
    clock_hz: float
    sram_bytes_per_pe: int
    reserved_bytes_per_pe: int
    link_bits_per_cycle: int
    alpha_cycles: float
    ramp_cycles: float
    beta_cycles: float
    routable_routes_per_pe: int
    fp32_macs_per_cycle: float
    fp16_macs_per_cycle: float
    op_overhead_cycles: float
    step_overhead_cycles: float
    collective_overhead_cycles: float
    task_switch_cycles: float
    calibration_error: float
    ops_exp: float
    ops_silu: float
    ops_rmsnorm_scale: float
    ops_rope: float
    ops_div: float
    ops_dequant_int8: float
    ops_dequant_int4: float
    spare_rows: int
    spare_cols: int
    power_w: float
    mac_energy_fp16_pj: float
    mac_energy_fp32_pj: float
    sram_read_energy_pj_per_byte: float
    sram_write_energy_pj_per_byte: float
    fabric_energy_pj_per_bit_hop: float
    static_power_w: float
    defective_pes: frozenset = frozenset()
    defect_recovery: str = "avoid"
    description: str = ""
    provenance: Mapping[str, Provenance] = field(default_factory=dict, compare=False)

    # ---- derived figures -------------------------------------------------
    @property
    def pes(self) -> int:
        return self.rows * self.cols

    @property
    def usable_sram_bytes_per_pe(self) -> int:
        return self.sram_bytes_per_pe - self.reserved_bytes_per_pe

    @property
    def total_sram_bytes(self) -> int:
        return self.pes * self.sram_bytes_per_pe

    @property
    def link_bytes_per_cycle(self) -> float:
        return self.link_bits_per_cycle / 8

    def macs_per_cycle(self, dtype: str) -> float:
        try:
            return {"fp16": self.fp16_macs_per_cycle, "fp32": self.fp32_macs_per_cycle}[dtype]
        except KeyError:
            raise HardwareError(f"unsupported dtype {dtype!r}; expected one of fp16, fp32") from None

    def dequant_ops(self, fmt: str) -> float:
        """SIMD ops per weight element to dequantise a stored ``int8`` or ``int4`` value."""
        try:
            return {"int8": self.ops_dequant_int8, "int4": self.ops_dequant_int4}[fmt]
        except KeyError:
            raise HardwareError(f"unsupported quantised format {fmt!r}; expected int8 or int4") from None

    @property
    def fabric_shape(self) -> tuple[int, int]:
        """Rows and columns of the physical fabric the defective PEs are given on: the usable
        rectangle plus its spare rows and columns, which the hardware remaps (``spare``) or
        the software places regions on (``reroute``); ``avoid``: the usable rectangle."""
        if self.defect_recovery in ("spare", "reroute"):
            return self.rows + self.spare_rows, self.cols + self.spare_cols
        return self.rows, self.cols

    def mac_energy_pj(self, dtype: str) -> float:
        try:
            return {"fp16": self.mac_energy_fp16_pj, "fp32": self.mac_energy_fp32_pj}[dtype]
        except KeyError:
            raise HardwareError(f"unsupported dtype {dtype!r}; expected one of fp16, fp32") from None

    def peak_flops(self, dtype: str = "fp16") -> float:
        return 2 * self.macs_per_cycle(dtype) * self.pes * self.clock_hz

    @property
    def aggregate_sram_bandwidth(self) -> float:
        """Bytes/s: each PE reads two 32-bit operands and writes one per cycle."""
        return self.pes * 12 * self.clock_hz

    @property
    def aggregate_fabric_bandwidth(self) -> float:
        """Bytes/s over all directed links between neighbouring PEs."""
        links = 2 * (self.rows * (self.cols - 1) + self.cols * (self.rows - 1))
        return links * self.link_bytes_per_cycle * self.clock_hz

    @property
    def bisection_bandwidth(self) -> float:
        """Bytes/s across the vertical cut through the middle, both directions."""
        return 2 * self.rows * self.link_bytes_per_cycle * self.clock_hz

    def cycles_to_seconds(self, cycles: float) -> float:
        return cycles / self.clock_hz

    def source_of(self, name: str) -> Provenance:
        return self.provenance.get(name, Provenance("unspecified", "assumed"))

    # ---- editing and export ----------------------------------------------
    def replace(self, **changes: Any) -> "WaferSpec":
        """A copy with some constants changed; changed constants are marked ``user``."""
        unknown = set(changes) - set(_FIELDS) - {"name", "defective_pes", "defect_recovery", "description"}
        if unknown:
            raise HardwareError(f"unknown wafer field(s): {', '.join(sorted(unknown))}; known: {', '.join(_FIELDS)}")
        prov = dict(self.provenance)
        values = {}
        for key, value in changes.items():
            if key in _FIELDS:
                values[key] = _coerce(key, value, where="override")
                prov[key] = Provenance("command-line/API override", "user")
            elif key == "defective_pes":
                values[key] = _coerce_defects(value, where="override")
            elif key == "defect_recovery":
                values[key] = _coerce_recovery(value, where="override")
            else:
                values[key] = value
        spec = dataclasses.replace(self, provenance=prov, **values)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.reserved_bytes_per_pe >= self.sram_bytes_per_pe:
            raise HardwareError(
                f"{self.name}: reserved_bytes_per_pe ({self.reserved_bytes_per_pe}) must be smaller "
                f"than sram_bytes_per_pe ({self.sram_bytes_per_pe})"
            )
        if self.defect_recovery not in DEFECT_RECOVERY:
            raise HardwareError(f"{self.name}: defect_recovery must be one of {', '.join(DEFECT_RECOVERY)}, "
                                f"got {self.defect_recovery!r}")
        fr, fc = self.fabric_shape
        where = ("physical fabric (the mesh plus its spare rows and columns)"
                 if self.defect_recovery in ("spare", "reroute") else "mesh")
        for r, c in self.defective_pes:
            if not (0 <= r < fr and 0 <= c < fc):
                raise HardwareError(f"{self.name}: defective PE ({r}, {c}) is outside the {fr}x{fc} {where}")

    def to_dict(self, with_provenance: bool = True) -> dict:
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        for key in _FIELDS:
            value = getattr(self, key)
            if with_provenance:
                out[key] = {"value": value, **self.source_of(key).to_dict()}
            else:
                out[key] = value
        out["defective_pes"] = sorted([list(p) for p in self.defective_pes])
        out["defect_recovery"] = self.defect_recovery
        return out

    def summary(self) -> dict:
        """Headline figures derived from the constants (what `waferllm hardware --json` prints)."""
        return {
            "name": self.name,
            "rows": self.rows,
            "cols": self.cols,
            "pes": self.pes,
            "defective_pes": len(self.defective_pes),
            "defect_recovery": self.defect_recovery,
            "clock_hz": self.clock_hz,
            "sram_bytes_per_pe": self.sram_bytes_per_pe,
            "usable_sram_bytes_per_pe": self.usable_sram_bytes_per_pe,
            "total_sram_bytes": self.total_sram_bytes,
            "peak_fp16_flops": self.peak_flops("fp16"),
            "peak_fp32_flops": self.peak_flops("fp32"),
            "aggregate_sram_bandwidth_bytes_per_s": self.aggregate_sram_bandwidth,
            "aggregate_fabric_bandwidth_bytes_per_s": self.aggregate_fabric_bandwidth,
            "bisection_bandwidth_bytes_per_s": self.bisection_bandwidth,
            "link_bytes_per_cycle": self.link_bytes_per_cycle,
            "alpha_cycles": self.alpha_cycles,
            "ramp_cycles": self.ramp_cycles,
            "beta_cycles": self.beta_cycles,
            "routable_routes_per_pe": self.routable_routes_per_pe,
            "power_w": self.power_w,
            "static_power_w": self.static_power_w,
            "mac_energy_fp16_pj": self.mac_energy_fp16_pj,
            "mac_energy_fp32_pj": self.mac_energy_fp32_pj,
            "sram_read_energy_pj_per_byte": self.sram_read_energy_pj_per_byte,
            "sram_write_energy_pj_per_byte": self.sram_write_energy_pj_per_byte,
            "fabric_energy_pj_per_bit_hop": self.fabric_energy_pj_per_bit_hop,
        }


def _coerce(key: str, value: Any, where: str):
    typ, positive, unit, _ = _FIELDS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise HardwareError(f"{where}: {key} must be a number, got {value!r}")
    try:
        num = float(value)
    except (ValueError, OverflowError):
        what = "a number" if isinstance(value, str) else f"at most {MAX_VALUE:g} {unit}"
        raise HardwareError(f"{where}: {key} must be {what}, got {_short(value)}") from None
    if not math.isfinite(num):
        raise HardwareError(f"{where}: {key} must be finite, got {value!r}")
    if typ is int:
        if num != int(num):
            raise HardwareError(f"{where}: {key} must be a whole number, got {value!r}")
        num = int(num)
    if positive and num <= 0:
        raise HardwareError(f"{where}: {key} must be > 0, got {value!r}")
    if not positive and num < 0:
        raise HardwareError(f"{where}: {key} must be >= 0, got {value!r}")
    if key in ("rows", "cols", "spare_rows", "spare_cols") and num > MAX_MESH_SIDE:
        raise HardwareError(f"{where}: {key} must be at most {MAX_MESH_SIDE:,} PEs (more than any wafer holds), "
                            f"got {_short(value)}")
    if abs(num) > MAX_VALUE:
        raise HardwareError(f"{where}: {key} must be at most {MAX_VALUE:g} {unit}, got {_short(value)}")
    if positive and typ is float and num < MIN_POSITIVE:
        raise HardwareError(f"{where}: {key} must be at least {MIN_POSITIVE:g} {unit}, got {_short(value)}")
    return num


def _short(value: Any) -> str:
    """``repr`` of a value, shortened when it is enormous (a 400-digit integer)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def read_constant(key: str, raw: Any, where: str, coerce) -> tuple[Any, Provenance]:
    """A constant as written in a file: a bare value (status ``user``) or a table with
    ``value``, ``source``, ``status`` and an optional ``range``; returns (raw value, provenance).
    ``coerce(key, value, where)`` checks a number (the range's ends too)."""
    if not isinstance(raw, Mapping):
        return raw, Provenance(where, "user")
    if "value" not in raw:
        raise HardwareError(f"{where}: {key} is a table but has no 'value'")
    status = str(raw.get("status", "user"))
    if status not in STATUSES:
        raise HardwareError(f"{where}: {key}.status must be one of {', '.join(STATUSES)}, got {status!r}")
    rng = raw.get("range")
    if rng is not None:
        try:
            lo, hi = (coerce(key, v, where) for v in rng)
        except (TypeError, ValueError):
            raise HardwareError(f"{where}: {key}.range must be [low, high], got {rng!r}") from None
        if lo > hi:
            raise HardwareError(f"{where}: {key}.range must be [low, high] with low <= high, got {rng!r}")
        rng = (lo, hi)
    return raw["value"], Provenance(str(raw.get("source", where)), status, rng)


def _coerce_defects(value: Any, where: str) -> frozenset:
    def whole(x) -> int:
        if isinstance(x, bool) or not isinstance(x, (int, float, str)) or float(x) != int(float(x)):
            raise ValueError(x)
        return int(float(x))

    if isinstance(value, (str, bytes, Mapping)):
        raise HardwareError(f"{where}: defective_pes must be a list of [row, col] pairs, got {_short(value)}")
    try:
        pes = frozenset((whole(r), whole(c)) for r, c in value)
    except (TypeError, ValueError, OverflowError):
        raise HardwareError(f"{where}: defective_pes must be a list of [row, col] pairs of whole numbers, "
                            f"got {_short(value)}") from None
    return pes


def _coerce_recovery(value: Any, where: str) -> str:
    if not isinstance(value, str) or value not in DEFECT_RECOVERY:
        raise HardwareError(f"{where}: defect_recovery must be one of {', '.join(DEFECT_RECOVERY)}, got {_short(value)}")
    return value


def from_mapping(data: Mapping[str, Any], where: str = "<mapping>", base: WaferSpec | None = None,
                 _chain: tuple[str, ...] = ()) -> WaferSpec:
    """Build a wafer from a parsed TOML/JSON mapping; with ``base``, the file only overrides it."""
    if not isinstance(data, Mapping):
        raise HardwareError(f"{where}: expected a table of wafer constants, got {type(data).__name__}")
    data = dict(data)
    if "base" in data and base is None:
        name = data.pop("base")
        if not isinstance(name, str) or not name:
            raise HardwareError(f"{where}: base must be a preset name ({', '.join(preset_names())}) or a wafer file, "
                                f"got {_short(name)}")
        base = get_wafer(name, _chain=_chain)
    else:
        data.pop("base", None)
    extra = {"name", "description", "defective_pes", "defect_recovery", "defect_rate", "defect_seed"}
    unknown = set(data) - set(_FIELDS) - extra
    if unknown:
        raise HardwareError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known keys: name, description, "
            f"defective_pes, defect_recovery, defect_rate, defect_seed, base, {', '.join(_FIELDS)}"
        )
    values: dict[str, Any] = {}
    prov: dict[str, Provenance] = dict(base.provenance) if base else {}
    for key in _FIELDS:
        if key not in data:
            if base is None and key in _DEFAULTS:
                values[key], prov[key] = _DEFAULTS[key]
                continue
            if base is None:
                raise HardwareError(f"{where}: missing required key {key!r} ({_FIELDS[key][3]}, {_FIELDS[key][2]})")
            values[key] = getattr(base, key)
            continue
        raw, prov[key] = read_constant(key, data[key], where, _coerce)
        values[key] = _coerce(key, raw, where)
    defects = _coerce_defects(data.get("defective_pes", []), where) if "defective_pes" in data else (
        base.defective_pes if base else frozenset()
    )
    recovery = (_coerce_recovery(data["defect_recovery"], where) if "defect_recovery" in data
                else base.defect_recovery if base else "avoid")
    spec = WaferSpec(
        name=str(data.get("name", base.name if base else Path(where).stem)),
        description=str(data.get("description", base.description if base else "")),
        defective_pes=defects,
        defect_recovery=recovery,
        provenance=prov,
        **values,
    )
    if "defect_rate" in data or "defect_seed" in data:
        from waferllm.hardware.defects import with_defect_rate

        if "defective_pes" in data:
            raise HardwareError(f"{where}: give defective_pes or defect_rate (with defect_seed), not both")
        return with_defect_rate(spec, data.get("defect_rate", 0.0), data.get("defect_seed", 0), recovery,
                                where=where)
    spec.validate()
    return spec


MAX_WAFER_FILE_BYTES = 1 << 20  # a wafer description is a few KB


def read_description_file(path: str | Path, kind: str, max_bytes: int,
                          _chain: tuple[str, ...] = ()) -> tuple[Any, tuple[str, ...]]:
    """The parsed TOML/JSON of a ``kind`` ("wafer", "cluster") description file, and the chain
    of files its ``base`` continues; a missing, oversized, unreadable or malformed file, or a
    chain of bases that loops, is a clear error."""
    path = Path(path)
    try:
        if not path.is_file():
            raise HardwareError(f"{kind} file not found: {path}")
        if path.stat().st_size > max_bytes:
            raise HardwareError(f"{path}: {path.stat().st_size:,} bytes is too large for a {kind} description "
                                f"(at most {max_bytes:,})")
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise HardwareError(f"{path}: cannot read the {kind} file ({exc.strerror or exc})") from None
    real = os.path.realpath(path)
    if real in _chain or len(_chain) >= 16:
        raise HardwareError(f"{path}: its chain of bases comes back to itself or is too long "
                            f"({' -> '.join(_chain + (real,))})")
    fmt = "JSON" if path.suffix.lower() == ".json" else "TOML"
    try:
        data = json.loads(text) if fmt == "JSON" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise HardwareError(f"{path}: not valid {fmt}: {exc}") from None
    except RecursionError:
        raise HardwareError(f"{path}: not valid {fmt}: nested too deeply") from None
    return data, _chain + (real,)


def load_wafer_file(path: str | Path, _chain: tuple[str, ...] = ()) -> WaferSpec:
    data, chain = read_description_file(path, "wafer", MAX_WAFER_FILE_BYTES, _chain)
    return from_mapping(data, where=str(path), _chain=chain)


def preset_names() -> list[str]:
    files = resources.files("waferllm.hardware") / "presets"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def get_wafer(name_or_path: "str | Path | WaferSpec", *, _chain: tuple[str, ...] = (), **overrides: Any) -> WaferSpec:
    """A preset by name (``wse2``, ``wse3``) or a TOML/JSON file, with optional overrides."""
    spec = preset_or_file(name_or_path, WaferSpec, "wafer", "presets", preset_names(),
                          lambda data, where: from_mapping(data, where=where),
                          lambda path: load_wafer_file(path, _chain=_chain), preset_label="preset")
    return spec.replace(**overrides) if overrides else spec


def preset_or_file(name_or_path, spec_type: type, kind: str, folder: str, names: list[str], parse, load_file,
                   preset_label: str):
    """A description as given (``spec_type``), a preset of ``hardware/FOLDER`` by name
    (``parse(mapping, where)``), or a file (``load_file(path)``); anything else a clear error."""
    if isinstance(name_or_path, spec_type):
        return name_or_path
    if not isinstance(name_or_path, (str, Path)):
        raise HardwareError(f"{kind} must be a preset name ({', '.join(names)}), a {kind} file or a "
                            f"{spec_type.__name__}, got {type(name_or_path).__name__}")
    key = str(name_or_path)
    if key.lower() in names:
        text = (resources.files("waferllm.hardware") / folder / f"{key.lower()}.toml").read_text(encoding="utf-8")
        return parse(tomllib.loads(text), f"{preset_label} {key.lower()}")
    if _exists(key):
        return load_file(key)
    raise HardwareError(f"unknown {kind} {_short(key)}: not a preset ({', '.join(names)}) nor an existing file")


def _exists(path: str) -> bool:
    try:
        return bool(path) and Path(path).exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["beta_cycles=40", "rows=100"]`` -> dict, for ``--set`` on the command line."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise HardwareError(f"override {_short(item)} must look like KEY=VALUE (e.g. --set beta_cycles=40)")
        key, value = item.split("=", 1)
        key, value = key.strip(), value.strip()
        if not key:
            raise HardwareError(f"override {_short(item)} has no KEY before '=' (e.g. --set beta_cycles=40)")
        if not value:
            raise HardwareError(f"override {_short(item)} has no VALUE after '=' (e.g. --set beta_cycles=40)")
        out[key] = value
    return out
