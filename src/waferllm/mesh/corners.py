"""Figures under several sets of wafer constants at once, from one execution.

A prediction's band reruns the same request with the wafer's assumed constants at the
ends of their ranges (:mod:`waferllm.engine.band`). The program (placement, kernels,
moves, replays) is the same in every run; only the costs that read those constants
differ. A :class:`Corners` is a float whose value is the nominal run's and which carries
the value of every corner beside it: a wafer holding Corners for the constants that differ
makes every cost computed from them a Corners (arithmetic goes value by value), and the
ledger, which adds, takes maxima and picks the slowest branch value by value too, ends
with each corner's totals. The nominal values are computed by the same float operations,
in the same order, as an ordinary run's.

This is only exact while the corners' programs are the same. :func:`tracking` watches for
what would break that: a comparison whose outcome differs between corners (a decision that
would take another path), a corner-dependent value turned into a plain number (``int()``,
``float()``, a numpy conversion), or an error. The caller then falls back to separate
runs. Values equal in every corner collapse to plain numbers. (The ``math`` module's
functions other than ceil/floor/trunc read the nominal value unseen: no cost uses them,
and tests compare the corners of one execution with separate runs.)
"""

from __future__ import annotations

import math
import numbers
import operator

_watch: list[dict] = []  # open tracking() records: what broke the shared program


def _flag(what: str) -> None:
    if _watch:
        _watch[-1][what] += 1


class tracking:
    """``with tracking() as t:`` -- after the block, ``t["diverged"]`` counts comparisons
    whose outcome differed between corners and ``t["lost"]`` corner-dependent values that
    became plain numbers (also kept as ``.seen``); both 0: every corner's figures are exact."""

    def __init__(self):
        self.seen = {"diverged": 0, "lost": 0}

    def __enter__(self) -> dict:
        _watch.append(self.seen)
        return self.seen

    def __exit__(self, *exc) -> bool:
        _watch.pop()
        return False


def _make(values, kind=float):
    """A Corners of ``values``, or a plain number when every corner agrees."""
    if values.count(values[0]) == len(values):
        return kind(values[0]) if kind is int else values[0]
    return Corners(values)


_PLAIN = (float, int)  # the usual other operand (checked before the slower abstract check)


def values(x, n: int) -> tuple:
    """The ``n`` values of ``x`` (a plain number: the same in every corner)."""
    return x.v if isinstance(x, Corners) else (x,) * n


def corner(x, i: int):
    """``x`` in corner ``i`` (0: nominal)."""
    return x.v[i] if isinstance(x, Corners) else x


def nominal(x):
    """The nominal value of ``x`` as a plain float (for figures the band does not cover)."""
    return float.__float__(x) if isinstance(x, Corners) else x


def _binary(op, kind=float):
    def method(self, other):
        a = self.v
        if type(other) in _PLAIN or (not isinstance(other, Corners) and isinstance(other, numbers.Real)):
            return _make(tuple([op(x, other) for x in a]), kind)
        if not isinstance(other, Corners) or len(other.v) != len(a):
            return NotImplemented
        return _make(tuple([op(x, y) for x, y in zip(a, other.v)]), kind)

    def reflected(self, other):
        if type(other) not in _PLAIN and not isinstance(other, numbers.Real):
            return NotImplemented
        return _make(tuple([op(other, x) for x in self.v]), kind)

    return method, reflected


def _compare(op):
    def method(self, other):
        if isinstance(other, Corners):
            ov = other.v
        elif isinstance(other, numbers.Real):
            ov = (other,) * len(self.v)
        else:
            return NotImplemented
        outcomes = [op(a, b) for a, b in zip(self.v, ov)]
        if any(o != outcomes[0] for o in outcomes):
            _flag("diverged")
        return outcomes[0]

    return method


def _unary(op, kind=float):
    def method(self, *args):
        return _make(tuple(op(a, *args) for a in self.v), kind)

    return method


class Corners(float):
    """A float (the nominal value) carrying its value in every corner (``v``, nominal first)."""

    __slots__ = ("v",)
    __array_ufunc__ = None  # numpy defers to these methods (or refuses) instead of dropping the corners

    def __new__(cls, v):
        obj = float.__new__(cls, v[0])
        obj.v = tuple(v)
        return obj

    __add__, __radd__ = _binary(operator.add)
    __sub__, __rsub__ = _binary(operator.sub)
    __mul__, __rmul__ = _binary(operator.mul)
    __truediv__, __rtruediv__ = _binary(operator.truediv)
    __floordiv__, __rfloordiv__ = _binary(operator.floordiv)
    __mod__, __rmod__ = _binary(operator.mod)
    __pow__, __rpow__ = _binary(operator.pow)
    __neg__ = _unary(operator.neg)
    __pos__ = _unary(operator.pos)
    __abs__ = _unary(abs)
    __ceil__ = _unary(math.ceil, int)
    __floor__ = _unary(math.floor, int)
    __trunc__ = _unary(math.trunc, int)

    def __round__(self, ndigits=None):
        return _make(tuple(round(a, ndigits) for a in self.v), int if ndigits is None else float)

    __lt__ = _compare(operator.lt)
    __le__ = _compare(operator.le)
    __gt__ = _compare(operator.gt)
    __ge__ = _compare(operator.ge)
    __eq__ = _compare(operator.eq)
    __ne__ = _compare(operator.ne)

    def __hash__(self):  # a different key from its nominal value's (a wafer of corners is another wafer)
        return hash(self.v)

    def __bool__(self):
        outcomes = [bool(a) for a in self.v]
        if any(o != outcomes[0] for o in outcomes):
            _flag("diverged")
        return outcomes[0]

    def _plain(self):
        _flag("lost")
        return float.__float__(self)

    def __float__(self):
        return self._plain()

    def __int__(self):
        return int(self._plain())

    def __index__(self):  # a size or a position that would differ between corners
        return int(self._plain())

    def __reduce__(self):
        return (Corners, (self.v,))


def cmax(a, b):
    """max(a, b) in every corner (no decision: the corners may take different maxima)."""
    if type(a) is not Corners and type(b) is not Corners:  # the usual case: plain numbers (max's own rule)
        return b if b > a else a
    n = len((a if isinstance(a, Corners) else b).v)
    return _make(tuple(max(x, y) for x, y in zip(values(a, n), values(b, n))))


def pick(cond, a, b):
    """``a`` where ``cond`` holds, else ``b``, corner by corner (``cond``: a bool, or one per corner)."""
    if isinstance(cond, tuple):
        n = len(cond)
        return _make(tuple(x if c else y for c, x, y in zip(cond, values(a, n), values(b, n))))
    return a if cond else b


def width(*xs) -> int:
    """How many values the Corners among ``xs`` hold (1: none is a Corners)."""
    return max((len(x.v) for x in xs if isinstance(x, Corners)), default=1)
