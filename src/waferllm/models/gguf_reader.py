"""A :class:`gguf.GGUFReader` that parses big metadata arrays in one pass.

``gguf.GGUFReader`` parses every metadata value eagerly in its constructor, and an array
one element at a time: a ``numpy.memmap`` slice (and for a string a second one) per
element. A tokenizer's vocabulary and merges (~50k strings each in SmolLM2's GGUF) then
cost a few seconds, most of it numpy's memmap subclass overhead.

:class:`FastGGUFReader` is the library's reader with one change: a key/value field holding a
non-empty array of scalars or strings keeps its elements' ``parts`` lazily
(:class:`ArrayParts`): a string array is walked once (in Python, 8-byte lengths only) to
find where each string lies, a scalar array is one ndarray view, and a part is made only
when asked for. Everything else -- the header, keys, scalar and string values, nested and
empty arrays, the tensor infos, the tensors' memory maps, the library's checks -- is the
library's own code (:meth:`FastGGUFReader._build_fields` is the library's loop with the
fast path added). A field from this reader has the same ``offset``, ``name``, ``data``
indices and ``types`` as the library's, and its parts hold the same dtypes and bytes, so
``ReaderField.contents()`` gives the same values; :func:`field_values` gives them without
making per-element parts (the strings decoded in one pass, :func:`decode_strings`, or
``ndarray.tolist()`` of the whole array). ``tests/test_gguf_reader.py`` checks all of
this against ``gguf.GGUFReader`` itself, for every scalar value type, strings, empty and
nested arrays, both byte orders, invalid UTF-8, and the embedded SmolLM2 file.

An array that would run past the end of the file raises ``ValueError`` here (the library
fails later, or walks a corrupt element count one empty slice at a time); the loader
reports either as a corrupt or truncated file (:class:`~waferllm.errors.ModelError`).
If the installed ``gguf`` changes the internals this builds on, the loader uses
``gguf.GGUFReader`` itself (:func:`fast_reader_supported`).
"""

from __future__ import annotations

import inspect
import re
import struct
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType, ReaderField

#: the parts before an array's elements: key length, key bytes, value type, item type, count
_HEAD = 5


class ArrayParts(Sequence):
    """The ``parts`` of a key/value field holding an array, with the elements' parts made on access.

    Parts 0-4 are the library's own (key length, key bytes, value type, item type, element
    count). Then, as ``gguf.GGUFReader`` lays them out, each scalar element is one part (a
    1-element array), each string element two (its uint64 length, its uint8 bytes).
    """

    def __init__(self, head: list, raw: np.ndarray, item_type: GGUFValueType, count: int, byte_order: str,
                 values: np.ndarray | None = None, starts: np.ndarray | None = None, lengths: np.ndarray | None = None):
        self._head = head
        self._raw = raw  # the whole file as a plain uint8 ndarray (no memmap subclass)
        self.item_type = item_type
        self.count = count
        self._values = values  # scalar arrays: every element, in the file's byte order
        self._starts = starts  # string arrays: file offset of each string's bytes
        self._lengths = lengths  # string arrays: each string's length in bytes
        self._len_dtype = np.dtype(np.uint64).newbyteorder(byte_order)

    @property
    def is_string(self) -> bool:
        return self._values is None

    def __len__(self) -> int:
        return _HEAD + self.count * (2 if self.is_string else 1)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("part index out of range")
        if i < _HEAD:
            return self._head[i]
        k = i - _HEAD
        if not self.is_string:
            return self._values[k:k + 1]
        e, is_bytes = divmod(k, 2)
        s = int(self._starts[e])
        if is_bytes:
            return self._raw[s:s + int(self._lengths[e])]
        return self._raw[s - 8:s].view(self._len_dtype)

    def values(self) -> list:
        """Every element as a Python value: what ``ReaderField.contents()`` returns."""
        if not self.is_string:
            return self._values.tolist()
        return decode_strings(self._raw, self._starts, self._lengths)


class FastGGUFReader(gguf.GGUFReader):
    """``gguf.GGUFReader`` whose array fields keep their elements' parts lazily (see the module doc)."""

    def _build_fields(self, offs: int, count: int) -> int:
        # The library's GGUFReader._build_fields, except that _fast_array takes the arrays it can.
        for _ in range(count):
            orig_offs = offs
            kv_klen, kv_kdata = self._get_str(offs)
            offs += int(kv_klen.nbytes + kv_kdata.nbytes)
            raw_kv_type = self._get(offs, np.uint32)
            offs += int(raw_kv_type.nbytes)
            head = [kv_klen, kv_kdata, raw_kv_type]
            fast = self._fast_array(offs, int(raw_kv_type[0]), head)
            if fast is not None:
                field_size, parts, data, types = fast
            else:
                field_size, field_parts, field_idxs, types = self._get_field_parts(offs, raw_kv_type[0])
                parts = head + field_parts
                data = [idx + len(head) for idx in field_idxs]
            self._push_field(ReaderField(orig_offs, str(bytes(kv_kdata), encoding="utf-8"), parts, data, types),
                             skip_sum=True)
            offs += field_size
        return offs

    def _fast_array(self, offs: int, raw_type: int, head: list):
        """``(size, parts, data, types)`` of an array of scalars or strings at ``offs``, or
        ``None`` to leave the value to the library (not an array, empty, nested, unknown)."""
        if raw_type != GGUFValueType.ARRAY:
            return None
        raw_itype = self._get(offs, np.uint32)
        alen = self._get(offs + 4, np.uint64)
        if raw_itype.size != 1 or alen.size != 1:
            return None  # past the end of the file: the library's code raises
        itype, n = int(raw_itype[0]), int(alen[0])
        if n == 0:
            return None
        try:
            itype = GGUFValueType(itype)
        except ValueError:
            return None  # an unknown type: the library's code raises
        raw = np.asarray(self.data)  # a plain ndarray over the same mapping
        start = offs + 12
        head = head + [raw_itype, alen]
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            dt = np.dtype(nptype)
            end = start + n * dt.itemsize
            if end > raw.size:
                raise ValueError(f"GGUF array of {n} {itype.name} values runs past the end of the file")
            values = raw[start:end].view(dt)
            values = values.view(values.dtype.newbyteorder(self.byte_order))
            parts = ArrayParts(head, raw, itype, n, self.byte_order, values=values)
            data = list(range(_HEAD, _HEAD + n))
        elif itype == GGUFValueType.STRING:
            starts, lengths, end = _scan_strings(raw, start, n, np.dtype(np.uint64).newbyteorder(self.byte_order))
            parts = ArrayParts(head, raw, itype, n, self.byte_order, starts=starts, lengths=lengths)
            data = list(range(_HEAD + 1, _HEAD + 2 * n, 2))
        else:
            return None  # arrays of arrays: the library's code
        return end - offs, parts, data, [GGUFValueType.ARRAY, itype]


@lru_cache(maxsize=1)
def fast_reader_supported() -> bool:
    """Whether the installed ``gguf`` package has the reader internals
    :class:`FastGGUFReader` builds on (``_build_fields(offs, count)``, ``_get``,
    ``_get_str``, ``_get_field_parts(orig_offs, raw_type)``, ``_push_field``) as this
    module knows them (as of gguf 0.19); if a release changes them, the loader uses the
    library's own reader (slower, same values)."""
    base = gguf.GGUFReader
    need = ("_build_fields", "_get", "_get_str", "_get_field_parts", "_push_field", "gguf_scalar_to_np", "byte_order")
    if not all(hasattr(base, a) for a in need):
        return False
    try:
        sig = {name: list(inspect.signature(getattr(base, name)).parameters)
               for name in ("_build_fields", "_get_field_parts", "_get_str", "_push_field")}
    except (TypeError, ValueError):
        return False
    return (sig["_build_fields"] == ["self", "offs", "count"]
            and sig["_get_field_parts"] == ["self", "orig_offs", "raw_type"]
            and sig["_get_str"] == ["self", "offset"] and sig["_push_field"][:2] == ["self", "field"])


def _scan_strings(raw: np.ndarray, offs: int, n: int, len_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """Where each of ``n`` consecutive GGUF strings (uint64 length, then bytes) starting at
    ``offs`` lies: (start of each string's bytes, each length, the offset after the last)."""
    size = raw.size
    if offs + 8 * n > size:  # every string takes at least its 8-byte length
        raise ValueError(f"GGUF string array of {n} strings runs past the end of the file")
    fmt = len_dtype.str[0] + "Q"
    mv = memoryview(raw)
    unpack = struct.Struct(fmt).unpack_from
    starts = [0] * n
    lengths = [0] * n
    for i in range(n):
        if offs + 8 > size:
            raise ValueError(f"GGUF string array: string {i} of {n} runs past the end of the file")
        (ln,) = unpack(mv, offs)
        offs += 8
        starts[i] = offs
        lengths[i] = ln
        offs += ln
    if offs > size:
        raise ValueError(f"GGUF string array: string {n - 1} of {n} runs past the end of the file")
    # (an earlier string running past the end makes the next length read fail above)
    return np.array(starts, dtype=np.int64), np.array(lengths, dtype=np.uint64), offs


#: a byte that never occurs in UTF-8, and the character ``surrogateescape`` decodes it to
_SEP, _SEP_CHAR = 0xFF, "\udcff"
#: any other byte ``surrogateescape`` had to escape: a string that is not valid UTF-8
_ESCAPED = re.compile("[\udc80-\udcfe]")


def decode_strings(raw: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[str]:
    """The strings at ``raw[starts[i]:starts[i] + lengths[i]]``, each decoded as strict UTF-8.

    One decode for all: the strings' bytes are gathered into one buffer with a 0xFF byte
    (never part of UTF-8) between them, decoded with ``surrogateescape`` (the separators
    become U+DCFF) and split there. If any string is not valid UTF-8 (an escaped byte
    shows up, or a 0xFF inside a string adds a piece), each string is decoded on its own,
    which raises the same ``UnicodeDecodeError`` as the library's ``str(bytes, 'utf-8')``.
    """
    n = int(lengths.size)
    if n == 0:
        return []
    lens = lengths.astype(np.int64)
    out_starts = np.cumsum(lens + 1) - (lens + 1)  # where each string goes, a separator after each
    total = int(out_starts[-1] + lens[-1])  # without the last separator
    blob = np.full(total + 1, _SEP, dtype=np.uint8)
    keep = np.ones(total + 1, dtype=bool)
    keep[out_starts + lens] = False
    dest = np.flatnonzero(keep)
    blob[dest] = raw[dest + np.repeat(starts.astype(np.int64) - out_starts, lens)]
    text = blob[:total].tobytes().decode("utf-8", "surrogateescape")
    pieces = text.split(_SEP_CHAR)
    if len(pieces) == n and not _ESCAPED.search(text):
        return pieces
    mv = memoryview(raw)
    return [str(mv[s:s + k], encoding="utf-8") for s, k in zip(starts.tolist(), lengths.tolist())]


def field_values(field: ReaderField) -> Any:
    """``field.contents()``, without per-element parts for an array this reader parsed."""
    if isinstance(field.parts, ArrayParts):
        return field.parts.values()
    return field.contents()
