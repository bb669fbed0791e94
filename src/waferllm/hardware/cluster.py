"""A cluster of wafers: N systems of one wafer preset joined by an inter-wafer link.

A cluster is data, like a wafer: an editable TOML or JSON file (presets in
``hardware/clusters/*.toml``; your own file may start from one with ``base = "cs2"``).
It names the wafer every system holds (``wafer``: a preset or a wafer file) and the link
between systems, each constant a bare value or ``{ value, source, status, range }``:

- ``link_bytes_per_s``: what one system's I/O moves each direction (SPEC section 7:
  1.2 Tb/s per CS-2/CS-3 system);
- ``hops`` and ``hop_latency_s``: the network elements a transfer crosses between two
  systems (its I/O ports and switches) and the latency of each (not published: assumed);
- ``transfer_overhead_s``: the fixed cost of one hand-off (the vendor's host-transfer
  benchmark pays ~200 us: the upper end of the assumed range);
- ``link_energy_pj_per_bit``: the energy of one bit over the link;
- ``max_wafers``: the most systems a prediction may use.

How many wafers a run uses (``wafers``) and which run which phase (``prefill_wafers``)
are the run's choice, set with :meth:`ClusterSpec.with_wafers`: by default every wafer
runs both phases on its share of the layers; with ``prefill_wafers = p`` the first p
wafers run prefill and the others decode.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from waferllm.errors import HardwareError
from waferllm.hardware.plmr import (Provenance, WaferSpec, _short, get_wafer, preset_or_file, read_constant,
                                    read_description_file)


#: name -> (type, unit, meaning); every link constant must be > 0 except where noted
LINK_FIELDS: dict[str, tuple[type, str, str]] = {
    "max_wafers": (int, "wafers", "the most systems a prediction may use"),
    "link_bytes_per_s": (float, "B/s", "inter-system I/O of one system, each direction"),
    "hops": (int, "hops", "network elements a transfer crosses between two systems (I/O ports, switches)"),
    "hop_latency_s": (float, "s", "latency of one hop through a system's I/O or a switch"),
    "transfer_overhead_s": (float, "s", "fixed cost of one hand-off between wafers"),
    "link_energy_pj_per_bit": (float, "pJ/bit", "energy of one bit over the inter-system link, end to end"),
}
#: link constants that make a run faster when they grow (the band's fast corner takes their high end)
FASTER_WHEN_LARGER = {"link_bytes_per_s"}
MAX_CLUSTER_FILE_BYTES = 1 << 20
MAX_WAFERS = 4096


@dataclass(frozen=True)
class ClusterSpec:
    """N wafers of one preset and the link between their systems (see the module docstring)."""

    name: str
    wafer: WaferSpec
    max_wafers: int
    link_bytes_per_s: float
    hops: int
    hop_latency_s: float
    transfer_overhead_s: float
    link_energy_pj_per_bit: float
    wafers: int = 1  # in use by this run
    prefill_wafers: int | None = None  # None: every wafer runs both phases; p: the first p run prefill
    description: str = ""
    provenance: Mapping[str, Provenance] = field(default_factory=dict, compare=False)

    # ---- the run's choice ------------------------------------------------------------
    def with_wafers(self, wafers: int, prefill_wafers: int | None = None) -> "ClusterSpec":
        """This cluster using ``wafers`` systems; with ``prefill_wafers`` = p, the first p run
        prefill and the other ``wafers - p`` decode."""
        if isinstance(wafers, bool) or not isinstance(wafers, int) or wafers < 1:
            raise HardwareError(f"wafers must be a positive whole number, got {wafers!r}")
        if wafers > self.max_wafers:
            raise HardwareError(f"{self.name} has at most {self.max_wafers} wafers (max_wafers), asked for {wafers}; "
                                f"raise max_wafers in a cluster file (base = \"{self.name}\") to use more")
        if prefill_wafers is not None:
            if isinstance(prefill_wafers, bool) or not isinstance(prefill_wafers, int) or \
                    not 1 <= prefill_wafers < wafers:
                raise HardwareError(f"prefill_wafers must leave at least one of the {wafers} wafers to decode: "
                                    f"a whole number from 1 to {wafers - 1}, got {prefill_wafers!r}"
                                    + (" (one wafer cannot run the phases apart: use 2 or more)" if wafers == 1 else ""))
        return dataclasses.replace(self, wafers=wafers, prefill_wafers=prefill_wafers)

    @property
    def layout(self) -> str:
        """``shared`` (every wafer runs both phases on its layers) or ``split`` (prefill and
        decode on different wafers)."""
        return "shared" if self.prefill_wafers is None else "split"

    def wafer_at(self, index: int) -> WaferSpec:
        """The wafer of system ``index``: the preset under its own name (``wse2[1]``), so that
        a move on one wafer can never be priced as if it reached another."""
        if not 0 <= index < self.wafers:
            raise HardwareError(f"wafer index {index} outside the {self.wafers} wafers in use")
        return dataclasses.replace(self.wafer, name=f"{self.wafer.name}[{index}]")

    # ---- the link model ----------------------------------------------------------------
    @property
    def latency_s(self) -> float:
        """Head latency of one transfer between two systems: every hop's."""
        return self.hops * self.hop_latency_s

    def link_seconds(self, nbytes: float, transfers: int = 1) -> float:
        """One system's link busy with ``nbytes`` in ``transfers`` hand-offs: latency, fixed
        costs, and the bytes at the link's rate (the wafer legs are the primitive's)."""
        if nbytes <= 0 and transfers <= 0:
            return 0.0
        return self.latency_s + transfers * self.transfer_overhead_s + nbytes / self.link_bytes_per_s

    # ---- provenance and export ---------------------------------------------------------
    def source_of(self, key: str) -> Provenance:
        return self.provenance.get(key, Provenance("unspecified", "assumed"))

    def replace(self, **changes: Any) -> "ClusterSpec":
        """A copy with link constants changed (marked ``user``), or another ``wafer``."""
        unknown = set(changes) - set(LINK_FIELDS) - {"wafer", "name", "description"}
        if unknown:
            raise HardwareError(f"unknown cluster field(s): {', '.join(sorted(unknown))}; known: wafer, "
                                f"{', '.join(LINK_FIELDS)}")
        prov, values = dict(self.provenance), {}
        for key, value in changes.items():
            if key in LINK_FIELDS:
                values[key] = _coerce(key, value, "override")
                prov[key] = Provenance("command-line/API override", "user")
            elif key == "wafer":
                values[key] = value if isinstance(value, WaferSpec) else get_wafer(value)
            else:
                values[key] = str(value)
        out = dataclasses.replace(self, provenance=prov, **values)
        if out.wafers > out.max_wafers:
            raise HardwareError(f"max_wafers {out.max_wafers} is fewer than the {out.wafers} wafers in use")
        return out

    def assumed_ranges(self) -> dict[str, tuple[float, float]]:
        """Link constants with status ``assumed`` and a declared range (the band spans them)."""
        return {k: p.range for k, p in self.provenance.items()
                if k in LINK_FIELDS and k != "max_wafers" and p.status == "assumed" and p.range is not None}

    def to_dict(self, with_provenance: bool = True) -> dict:
        out: dict[str, Any] = {"name": self.name, "description": self.description, "wafer": self.wafer.name,
                               "wafers": self.wafers, "layout": self.layout, "prefill_wafers": self.prefill_wafers}
        for key in LINK_FIELDS:
            v = getattr(self, key)
            out[key] = {"value": v, **self.source_of(key).to_dict()} if with_provenance else v
        return out


# ------------------------------------------------------------------ loading


def _coerce(key: str, value: Any, where: str):
    typ, unit, _ = LINK_FIELDS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise HardwareError(f"{where}: {key} must be a number ({unit}), got {_short(value)}")
    try:
        num = float(value)
    except (ValueError, OverflowError):
        raise HardwareError(f"{where}: {key} must be a number ({unit}), got {_short(value)}") from None
    if not math.isfinite(num) or num <= 0:
        raise HardwareError(f"{where}: {key} must be a finite number > 0 ({unit}), got {_short(value)}")
    if typ is int:
        if num != int(num):
            raise HardwareError(f"{where}: {key} must be a whole number, got {_short(value)}")
        num = int(num)
        if key == "max_wafers" and num > MAX_WAFERS:
            raise HardwareError(f"{where}: max_wafers must be at most {MAX_WAFERS:,}, got {_short(value)}")
    return num


def from_mapping(data: Mapping[str, Any], where: str = "<mapping>", _chain: tuple[str, ...] = ()) -> ClusterSpec:
    """A cluster from a parsed TOML/JSON table (``base`` names a cluster it starts from)."""
    if not isinstance(data, Mapping):
        raise HardwareError(f"{where}: expected a table of cluster constants, got {type(data).__name__}")
    data = dict(data)
    base = None
    if "base" in data:
        name = data.pop("base")
        if not isinstance(name, str) or not name:
            raise HardwareError(f"{where}: base must be a cluster preset ({', '.join(cluster_names())}) or a cluster "
                                f"file, got {_short(name)}")
        base = get_cluster(name, _chain=_chain)
    unknown = set(data) - set(LINK_FIELDS) - {"name", "description", "wafer"}
    if unknown:
        raise HardwareError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known keys: name, description, "
                            f"base, wafer, {', '.join(LINK_FIELDS)}")
    if "wafer" in data:
        wafer = data["wafer"]
        if not isinstance(wafer, str) or not wafer:
            raise HardwareError(f"{where}: wafer must be a wafer preset name or a wafer file, got {_short(wafer)}")
        spec = get_wafer(wafer)
    elif base is not None:
        spec = base.wafer
    else:
        raise HardwareError(f"{where}: missing required key 'wafer' (the wafer preset or file every system holds)")
    values: dict[str, Any] = {}
    prov: dict[str, Provenance] = dict(base.provenance) if base else {}
    for key in LINK_FIELDS:
        if key not in data:
            if base is None:
                raise HardwareError(f"{where}: missing required key {key!r} ({LINK_FIELDS[key][2]}, "
                                    f"{LINK_FIELDS[key][1]})")
            values[key] = getattr(base, key)
            continue
        raw, prov[key] = read_constant(key, data[key], where, _coerce)
        values[key] = _coerce(key, raw, where)
    return ClusterSpec(name=str(data.get("name", base.name if base else Path(where).stem)), wafer=spec,
                       description=str(data.get("description", base.description if base else "")),
                       provenance=prov, **values)


def cluster_names() -> list[str]:
    files = resources.files("waferllm.hardware") / "clusters"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def load_cluster_file(path: str | Path, _chain: tuple[str, ...] = ()) -> ClusterSpec:
    data, chain = read_description_file(path, "cluster", MAX_CLUSTER_FILE_BYTES, _chain)
    return from_mapping(data, where=str(path), _chain=chain)


def get_cluster(name_or_path: "str | Path | ClusterSpec", wafer: WaferSpec | str | None = None, *,
                _chain: tuple[str, ...] = (), **overrides: Any) -> ClusterSpec:
    """A cluster preset (``cs2``, ``cs3``) or file; ``wafer`` replaces the wafer its systems
    hold (e.g. one with ``--set`` overrides), ``overrides`` its link constants."""
    spec = preset_or_file(name_or_path, ClusterSpec, "cluster", "clusters", cluster_names(),
                          lambda data, where: from_mapping(data, where=where, _chain=_chain),
                          lambda path: load_cluster_file(path, _chain=_chain), preset_label="cluster preset")
    if wafer is not None:
        spec = dataclasses.replace(spec, wafer=wafer if isinstance(wafer, WaferSpec) else get_wafer(wafer))
    return spec.replace(**overrides) if overrides else spec


def cluster_for(wafer: WaferSpec | str) -> ClusterSpec:
    """The cluster preset of a wafer's systems (``wse2`` -> ``cs2``, ``wse3`` -> ``cs3``) holding
    this very wafer; a wafer of no preset's gets the ``cs2`` link (the same 1.2 Tb/s I/O)."""
    spec = wafer if isinstance(wafer, WaferSpec) else get_wafer(wafer)
    for name in cluster_names():
        c = get_cluster(name)
        if c.wafer.name == spec.name.split("[")[0]:
            return dataclasses.replace(c, wafer=spec)
    c = get_cluster("cs2")
    return dataclasses.replace(c, wafer=spec, description=c.description + f" (link of cs2, wafer {spec.name})")

