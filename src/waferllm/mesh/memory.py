"""Per-PE SRAM accounting for a region.

Every allocation is charged to every PE of the region it lives on (a scalar when all
PEs hold the same bytes, or a rows x cols array when they do not). Going over a PE's
usable SRAM raises :class:`SRAMOverflowError` naming the region, the fullest PE, the
capacity and what was being allocated.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import numpy as np

from waferllm.errors import SRAMOverflowError


class SRAM:
    def __init__(self, region, capacity: int | None = None):
        self.region = region
        self.capacity = int(capacity if capacity is not None else region.wafer.usable_sram_bytes_per_pe)
        self._uniform = 0  # bytes held by every PE
        self._varying: np.ndarray | None = None  # extra bytes per PE
        self._allocs: dict[int, tuple[str, object]] = {}
        self._ids = itertools.count()
        self.peak_bytes = 0
        self.peak_by_name: dict[str, int] = {}

    def used_max(self) -> int:
        extra = int(self._varying.max()) if self._varying is not None else 0
        return self._uniform + extra

    def used(self) -> np.ndarray:
        base = np.full(self.region.shape, self._uniform, dtype=np.int64)
        return base + self._varying if self._varying is not None else base

    def by_name(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, b in self._allocs.values():
            out[name] = out.get(name, 0) + (int(np.max(b)) if isinstance(b, np.ndarray) else int(b))
        return out

    def alloc(self, name: str, bytes_per_pe) -> int:
        """Charge ``bytes_per_pe`` (int or rows x cols array) to the region; returns a handle."""
        if isinstance(bytes_per_pe, np.ndarray):
            b = bytes_per_pe.astype(np.int64)
            worst = self._uniform + int(((self._varying if self._varying is not None else 0) + b).max())
        else:
            b = int(bytes_per_pe)
            worst = self.used_max() + b
        if worst > self.capacity:
            holders = ", ".join(f"{n} {v:,} B" for n, v in sorted(self.by_name().items(), key=lambda kv: -kv[1])[:6])
            raise SRAMOverflowError(
                f"SRAM overflow on region {self.region.describe()}: allocating {name!r} "
                f"({int(np.max(b)):,} B/PE) would bring the fullest PE to {worst:,} B, over its "
                f"{self.capacity:,} B usable ({self.region.wafer.sram_bytes_per_pe:,} B SRAM - "
                f"{self.region.wafer.reserved_bytes_per_pe:,} B reserved) by {worst - self.capacity:,} B. "
                f"Already held per PE: {holders or 'nothing'}. Use a larger region, smaller tiles or fewer layers per region."
            )
        if isinstance(b, np.ndarray):
            self._varying = b.copy() if self._varying is None else self._varying + b
        else:
            self._uniform += b
        handle = next(self._ids)
        self._allocs[handle] = (name, b)
        self.peak_bytes = max(self.peak_bytes, worst)
        self.peak_by_name[name] = max(self.peak_by_name.get(name, 0), int(np.max(b)))
        return handle

    def resize(self, handle: int, bytes_per_pe) -> None:
        """Change an allocation in place (e.g. a KV cache that grows), with the same checks."""
        name, old = self._allocs[handle]
        self.free(handle)
        try:
            new = self.alloc(name, bytes_per_pe)
        except SRAMOverflowError:
            # keep the old allocation: a failed resize must not lose it from the accounting
            restored = self.alloc(name, old)
            self._allocs[handle] = self._allocs.pop(restored)
            raise
        self._allocs[handle] = self._allocs.pop(new)

    def free(self, handle: int) -> None:
        entry = self._allocs.pop(handle, None)
        if entry is None:
            return
        _, b = entry
        if isinstance(b, np.ndarray):
            self._varying = self._varying - b
        else:
            self._uniform -= b

    @contextmanager
    def lent(self, handle: int | None):
        """Let a kernel use an allocation's space as one of its own rotating buffers.

        MeshGEMM rotates a placed weight through the mesh with one receive buffer: the
        placed tile's space is reused, so during the kernel the weight is not counted
        twice. Afterwards (the weight is home again) the allocation is restored.
        """
        entry = self._allocs.get(handle) if handle is not None else None
        if entry is None:
            yield
            return
        self.free(handle)
        try:
            yield
        finally:
            restored = self.alloc(entry[0], entry[1])
            self._allocs[handle] = self._allocs.pop(restored)
