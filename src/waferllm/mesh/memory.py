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
        self._varying_max = 0  # its largest entry (kept: every allocation checks it)
        self.version = 0  # changes with every allocation and release: what was derived before is stale
        self._memo: dict = {}  # derived figures of this version (see memo)
        self._allocs: dict[int, tuple[str, object]] = {}
        self._ids = itertools.count()
        self.peak_bytes = 0
        self.peak_by_name: dict[str, int] = {}
        # name -> (the fullest PE's usage, the allocations held) when an allocation of that
        # name brought the usage highest: the program points where usage peaks
        self._highs: dict[str, tuple[int, dict[int, tuple[str, object]]]] = {}
        self._footprint: Footprint | None = None  # a program being recorded (see recording)
        # id(footprint) -> (footprint, the highest usage it was replayed from): the marks only rise,
        # so replaying it again from no higher changes nothing (a decode stage replays each step)
        self._replayed: dict[int, tuple[Footprint, int]] = {}

    def used_max(self) -> int:
        return self._uniform + self._varying_max

    def copy(self) -> "SRAM":
        """An independent accounting holding the same allocations under the same handles
        (for a shape-only twin of the region: see ``Mesh.dry_twin``)."""
        twin = SRAM(self.region, self.capacity)
        twin._uniform, twin._varying_max = self._uniform, self._varying_max
        twin._varying = None if self._varying is None else self._varying.copy()
        twin._allocs = dict(self._allocs)
        start = next(self._ids)  # both count on from here: handles stay unique to each
        self._ids, twin._ids = itertools.count(start), itertools.count(start)
        twin.peak_bytes, twin.peak_by_name, twin._highs = self.peak_bytes, dict(self.peak_by_name), dict(self._highs)
        return twin

    def _set_varying(self, v: np.ndarray) -> None:
        self._varying = v
        self._varying_max = int(v.max())

    def memo(self, key, build):
        """``build()``, remembered until the accounting next changes (analyses of what a
        region holds read it several times)."""
        if self._memo.get("version") != self.version:
            self._memo = {"version": self.version}
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def used(self) -> np.ndarray:
        base = np.full(self.region.shape, self._uniform, dtype=np.int64)
        return base + self._varying if self._varying is not None else base

    def by_name(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, b in self._allocs.values():
            out[name] = out.get(name, 0) + (int(np.max(b)) if isinstance(b, np.ndarray) else int(b))
        return out

    def held(self) -> dict[int, tuple[str, int]]:
        """Every live allocation: handle -> (name, bytes on the fullest PE now)."""
        return _on_fullest(self._allocs, self.region.shape)

    def held_at_peak(self) -> dict[int, tuple[str, int]]:
        """The allocations live when the fullest PE was at its highest: handle -> (name,
        bytes on that PE). They sum to that highest usage; an allocation held now has the
        same handle in :meth:`held`."""
        if not self._highs:
            return {}
        return _on_fullest(_held(max(self._highs.values(), key=lambda rec: rec[0])[1]), self.region.shape)

    def held_at_highs(self) -> dict[str, dict[int, tuple[str, int]]]:
        """For each allocation name, what was live (as :meth:`held_at_peak`) when an
        allocation of that name brought the fullest PE highest: every program point where
        usage peaks, e.g. a decode step's attention and its LM head, however they rank."""
        fullest: dict = {}  # the arrays held (by identity, all alive here) -> their fullest PE
        bases: dict = {}  # id(a replay's base) -> it read on its fullest PE (see _Replayed.on_fullest)
        shape = self.region.shape
        return {name: allocs.on_fullest(shape, fullest, bases) if isinstance(allocs, _Replayed)
                else _on_fullest(allocs, shape, fullest) for name, (_, allocs) in self._highs.items()}

    def alloc(self, name: str, bytes_per_pe) -> int:
        """Charge ``bytes_per_pe`` (int or rows x cols array) to the region; returns a handle."""
        if isinstance(bytes_per_pe, np.ndarray):
            b = bytes_per_pe.astype(np.int64)
            worst = self._uniform + int(((self._varying if self._varying is not None else 0) + b).max())
            top = int(b.max())
        else:
            b = top = int(bytes_per_pe)
            worst = self._uniform + self._varying_max + b
        if worst > self.capacity:
            raise self._overflow(name, int(np.max(b)), worst)
        if isinstance(b, np.ndarray):
            self._set_varying(b.copy() if self._varying is None else self._varying + b)
        else:
            self._uniform += b
        self.version += 1
        handle = next(self._ids)
        self._allocs[handle] = (name, b)
        if worst > self.peak_bytes:
            self.peak_bytes = worst
        if top > self.peak_by_name.get(name, -1):
            self.peak_by_name[name] = top
        high = self._highs.get(name)
        if high is None or worst > high[0]:
            self._highs[name] = (worst, dict(self._allocs))
        if self._footprint is not None:
            self._footprint.note(self, name, worst, top)
        return handle

    # ---- replaying a program's high-water marks ----------------------------------------
    @contextmanager
    def recording(self):
        """``with sram.recording() as fp:`` -- note how a program's allocations raise the
        usage above what the region held when it began, for :meth:`replay`."""
        outer, self._footprint = self._footprint, Footprint(self)
        try:
            yield self._footprint
        finally:
            self._footprint = outer

    def replay(self, fp: "Footprint") -> None:
        """The high-water marks a recorded program would set, run again from what the region
        holds now (the peak, and each name's highest point with what was held there): a
        program replayed for its cost leaves the SRAM accounting as executing it would. Its
        allocations are all released by its end, but what it keeps, which the replaying code
        allocates itself. Each name's highest point is the program's highest for that name
        (usage rises alike from any start), so only those are looked at."""
        level = self.used_max()
        seen = self._replayed.get(id(fp))
        if seen is not None and seen[0] is fp and seen[1] >= level:
            return
        if level + fp.rise > self.capacity:  # executing it from here would overflow: so does its replay
            name, (rise, top, _, _) = max(fp.highest().items(), key=lambda kv: kv[1][0])
            raise self._overflow(name, top, level + rise)
        self.peak_bytes = max(self.peak_bytes, level + fp.rise)
        base = None
        for name, (rise, top, transient, lent) in fp.highest().items():
            if top > self.peak_by_name.get(name, -1):
                self.peak_by_name[name] = top
            high = self._highs.get(name)
            if high is None or level + rise > high[0]:
                base = dict(self._allocs) if base is None else base  # one copy serves every name
                self._highs[name] = (level + rise, _Replayed(base, lent, transient))
        self._replayed[id(fp)] = (fp, level)

    def _overflow(self, name: str, nbytes: int, worst: int) -> SRAMOverflowError:
        holders = ", ".join(f"{n} {v:,} B" for n, v in sorted(self.by_name().items(), key=lambda kv: -kv[1])[:6])
        return SRAMOverflowError(
            f"SRAM overflow on region {self.region.describe()}: allocating {name!r} "
            f"({nbytes:,} B/PE) would bring the fullest PE to {worst:,} B, over its "
            f"{self.capacity:,} B usable ({self.region.wafer.sram_bytes_per_pe:,} B SRAM - "
            f"{self.region.wafer.reserved_bytes_per_pe:,} B reserved) by {worst - self.capacity:,} B. "
            f"Already held per PE: {holders or 'nothing'}. Use a larger region, smaller tiles or fewer layers per region."
        )

    def _rekey(self, new: int, handle: int) -> None:
        """Give the allocation just made as ``new`` the handle ``handle`` (resize, lent)."""
        entry = self._allocs[handle] = self._allocs.pop(new)
        self.version += 1
        high = self._highs.get(entry[0])  # only the allocation itself can have recorded it
        if high is not None and not isinstance(high[1], _Replayed) and new in high[1]:
            high[1][handle] = high[1].pop(new)

    def resize(self, handle: int, bytes_per_pe) -> None:
        """Change an allocation in place (e.g. a KV cache that grows), with the same checks."""
        name, old = self._allocs[handle]
        self.free(handle)
        try:
            new = self.alloc(name, bytes_per_pe)
        except SRAMOverflowError:
            # keep the old allocation: a failed resize must not lose it from the accounting
            self._rekey(self.alloc(name, old), handle)
            raise
        self._rekey(new, handle)

    def free(self, handle: int) -> None:
        entry = self._allocs.pop(handle, None)
        if entry is None:
            return
        _, b = entry
        if isinstance(b, np.ndarray):
            self._set_varying(self._varying - b)
        else:
            self._uniform -= b
        self.version += 1

    @contextmanager
    def lent(self, *tensors):
        """Let a kernel use tensors' space as its own rotating buffers.

        MeshGEMM rotates its operands through the mesh, each with one receive buffer: an
        operand's own space is reused, so during the kernel it is not counted twice.
        Afterwards (the operands are home again) the allocations are restored. Tensors
        without an allocation here (or already lent) are skipped.
        """
        lent = []
        for t in tensors:
            handle = getattr(t, "_handle", None)
            entry = self._allocs.get(handle) if handle is not None else None
            if entry is not None:
                self.free(handle)
                lent.append((handle, entry))
        try:
            yield
        finally:
            for handle, entry in lent:
                self._rekey(self.alloc(entry[0], entry[1]), handle)

    # ---- explicit lifetimes -------------------------------------------------------
    def release(self, *tensors) -> None:
        """End the lifetime of tensors now (their last use): their bytes are free for what
        comes next, whoever still holds a Python reference to them."""
        for t in tensors:
            handle = getattr(t, "_handle", None)
            if handle is not None:
                self.free(handle)

    @contextmanager
    def scope(self):
        """``with sram.scope() as s:`` -- a program step's lifetimes (see :class:`Scope`)."""
        s = Scope(self)
        try:
            yield s
        finally:
            s.close()


def _on_fullest(allocs: dict, shape, fullest: dict | None = None) -> dict[int, tuple[str, int]]:
    """handle -> (name, bytes) on the PE that ``allocs`` fill most (arrays: that PE's entry).
    ``fullest``: that PE, remembered by the arrays held (snapshots alive at once share them)."""
    varying = {h: b for h, (_, b) in allocs.items() if isinstance(b, np.ndarray)}
    if not varying:
        return {h: (name, int(b)) for h, (name, b) in allocs.items()}
    key = tuple(id(b) for b in varying.values())
    at = None if fullest is None else fullest.get(key)
    if at is None:
        at = np.unravel_index(int(np.argmax(sum(varying.values()))), shape)
        if fullest is not None:
            fullest[key] = at
    return {h: (name, int(b[at]) if h in varying else int(b)) for h, (name, b) in allocs.items()}


class Footprint:
    """How a program's allocations raised a region's usage: for each allocation, its name,
    the rise of the fullest PE over the usage when the program began, its own largest
    bytes on a PE, the program's own
    allocations held then (name, bytes), and how many of what it began with it had lent
    out (a MeshGEMM rotates its operands through their own space). Uniform allocations rise
    alike from any start."""

    def __init__(self, sram: SRAM):
        self.start = sram.used_max()
        self.held = dict.fromkeys(sram._allocs)  # what the region held when the program began
        self.points: list[tuple[str, int, int, tuple, tuple]] = []
        self._highest: dict | None = None
        self._rise: int | None = None

    def note(self, sram: SRAM, name: str, worst: int, top: int) -> None:
        now, held = sram._allocs, self.held
        gone = held.keys() - now.keys()
        lent = tuple(h for h in held if h in gone) if gone else ()
        # what the program allocated was inserted after everything the region held when it
        # began: read from the newest back until all of it is found, in insertion order
        count, mine = len(now) - len(held) + len(gone), []
        if count:
            for h, entry in reversed(now.items()):
                if h not in held:
                    mine.append(entry)
                    if len(mine) == count:
                        break
            mine.reverse()
        mine = tuple(mine)
        self.points.append((name, worst - self.start, top, mine, lent))
        self._highest = self._rise = None

    @property
    def rise(self) -> int:
        """The program's peak over its start (read at every replay: kept once known)."""
        if self._rise is None:
            self._rise = max((p[1] for p in self.points), default=0)
        return self._rise

    def highest(self) -> dict[str, tuple[int, int, tuple, tuple]]:
        """Per name: its first highest point (rise, what was held then) with the name's
        largest allocation (top), as a replay applies them."""
        if self._highest is None:
            out: dict = {}
            for name, rise, top, mine, lent in self.points:
                best = out.get(name)
                if best is None or rise > best[0]:
                    out[name] = (rise, max(top, best[1]) if best else top, mine, lent)
                elif top > best[1]:
                    out[name] = (best[0], top, best[2], best[3])
            self._highest = out
        return self._highest


class _Replayed:
    """A high-water snapshot a replay set: what the region held then (``base``, shared by
    the snapshots of one replay), less what the program had lent out, plus what the program
    itself held; a dict is built only when read."""

    __slots__ = ("base", "lent", "transient")

    def __init__(self, base: dict, lent: tuple, transient: tuple):
        self.base, self.lent, self.transient = base, lent, transient

    def on_fullest(self, shape, fullest: dict, bases: dict) -> dict[int, tuple[str, int]]:
        """``_on_fullest(self.held(), ...)``. The snapshots of one replay share their base: when
        what the program lent and held is uniform (the fullest PE is the base's), the base is
        read once for them all and each takes it less the lent, plus its own."""
        lent = self.lent
        if any(isinstance(b, np.ndarray) for _, b in self.transient) or any(
                isinstance(self.base[h][1], np.ndarray) for h in lent if h in self.base):
            return _on_fullest(self.held(), shape, fullest)
        read = bases.get(id(self.base))
        if read is None:
            read = bases[id(self.base)] = _on_fullest(self.base, shape, fullest)
        out = dict(read)
        for h in lent:
            out.pop(h, None)
        out.update({-1 - i: (name, int(b)) for i, (name, b) in enumerate(self.transient)})
        return out

    def held(self) -> dict:
        out = dict(self.base)
        for h in self.lent:
            out.pop(h, None)
        out.update({-1 - i: entry for i, entry in enumerate(self.transient)})  # never a live handle
        return out


def _held(allocs) -> dict:
    return allocs.held() if isinstance(allocs, _Replayed) else allocs


class Scope:
    """The lifetimes of what one program step (e.g. a layer) allocates on a region.

    Every allocation made on this SRAM while the scope is open is released when it
    closes, unless kept (``keep``: it outlives the step, like the hidden state a layer
    returns); ``release`` ends a tensor's lifetime earlier, at its last use. The reported
    peak is then what the program declares, not when Python drops a reference. Scopes
    nest: what an inner scope keeps belongs to the enclosing one. Allocations that
    already existed (placed weights, a cache that grows) are never touched.
    """

    def __init__(self, sram: SRAM):
        self.sram = sram
        # allocation handles only increase: everything from this one on is the step's
        self.first = next(sram._ids)
        self.kept: set[int] = set()

    def keep(self, *tensors):
        """Let tensors outlive the step; returns them (one tensor, or a tuple)."""
        for t in tensors:
            handle = getattr(t, "_handle", None)
            if handle is not None:
                self.kept.add(handle)
        return tensors[0] if len(tensors) == 1 else tensors

    def release(self, *tensors) -> None:
        """End tensors' lifetimes at their last use (see :meth:`SRAM.release`)."""
        self.sram.release(*tensors)

    def close(self) -> None:
        for handle in [h for h in self.sram._allocs if h >= self.first and h not in self.kept]:
            self.sram.free(handle)
