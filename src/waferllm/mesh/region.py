"""Regions: rectangles of PEs on a wafer, and the execution context that runs on one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from waferllm.errors import MeshError
from waferllm.hardware.plmr import WaferSpec


@dataclass(frozen=True)
class Region:
    """A rectangle of PEs: rows [row0, row0+rows) x cols [col0, col0+cols) of the wafer."""

    wafer: WaferSpec
    rows: int
    cols: int
    row0: int = 0
    col0: int = 0
    name: str = "region"
    # physical columns the region spans (0: ``cols``): wider on a wafer whose defects are
    # rerouted in software, whose regions skip the defective PEs of each row
    span: int = 0

    def __post_init__(self):
        w = self.wafer
        if (not w.defective_pes and type(self.rows) is int and type(self.cols) is int and self.rows > 0
                and self.cols > 0 and 0 <= self.row0 and 0 <= self.col0 and self.row0 + self.rows <= w.rows
                and self.col0 + self.cols <= w.cols):
            return  # the usual case, checked at once: a rectangle on a perfect mesh (planners make thousands)
        for label, v in (("rows", self.rows), ("cols", self.cols)):
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise MeshError(f"region {self.name!r}: {label} must be a positive integer, got {v!r}")
        # software rerouting places regions over the spare columns too
        width = w.cols + (w.spare_cols if w.defect_recovery == "reroute" and w.defective_pes else 0)
        if self.row0 < 0 or self.col0 < 0 or self.row0 + self.rows > w.rows or self.col0 + self.cols > width:
            raise MeshError(
                f"region {self.name!r} ({self.rows}x{self.cols} at row {self.row0}, col {self.col0}) lies outside "
                f"the {w.rows}x{w.cols} mesh of {w.name}; the largest square region is {min(w.rows, w.cols)}x{min(w.rows, w.cols)}"
            )
        if w.defect_recovery == "reroute" and w.defective_pes:
            from waferllm.hardware.defects import reroute_holds, reroute_span

            if not reroute_holds(w, self.row0, self.rows, self.col0, self.cols, self.span or self.cols):
                need = reroute_span(w, self.row0, self.rows, self.col0, self.cols)
                raise MeshError(
                    f"region {self.name!r} ({self.rows}x{self.cols} at row {self.row0}, col {self.col0}, spanning "
                    f"{self.span or self.cols} columns) has a row with fewer than {self.cols} healthy PEs; "
                    + (f"it needs to span {need} columns" if need else "the wafer is too narrow there"))
            return
        if w.defect_recovery == "spare":  # the hardware hides the defects: a perfect rectangle
            return
        bad = [
            (r, c) for r, c in w.defective_pes
            if self.row0 <= r < self.row0 + self.rows and self.col0 <= c < self.col0 + self.cols
        ]
        if bad:
            raise MeshError(
                f"region {self.name!r} contains defective PE(s) {sorted(bad)[:5]}{'...' if len(bad) > 5 else ''}; "
                "place the region on healthy PEs only"
            )

    @classmethod
    def inside(cls, wafer: WaferSpec, rows: int, cols: int, row0: int, col0: int, name: str) -> "Region":
        """``Region(wafer, rows, cols, row0, col0, name)`` for a rectangle a planner has already
        placed inside a perfect mesh (what ``__post_init__``'s usual case checks, asserted
        here): a tuner's smallest grid tiles the wafer with thousands of them."""
        if wafer.defective_pes or not (0 < rows and 0 < cols and 0 <= row0 and 0 <= col0 and row0 + rows <= wafer.rows
                                       and col0 + cols <= wafer.cols):
            return cls(wafer, rows, cols, row0, col0, name)
        out = object.__new__(cls)
        out.__dict__.update(wafer=wafer, rows=int(rows), cols=int(cols), row0=row0, col0=col0, name=name, span=0)
        return out

    @property
    def pes(self) -> int:
        return self.rows * self.cols

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def describe(self) -> str:
        wide = f" spanning {self.span} columns" if self.span and self.span != self.cols else ""
        return f"{self.name} {self.rows}x{self.cols}@({self.row0},{self.col0}){wide}"
