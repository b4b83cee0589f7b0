"""What travels in a dispatch and a combine, and the local passes around the transfers.

A dispatch sends two messages per peer, posted back to back on one communicator: the token rows
(``[M, D]`` in the payload dtype, contiguous, so that packing is one contiguous ``take`` and the
receiver computes on the received buffer in place) and a small metadata row per token
(:class:`RowLayout`: the receiver's local expert id and routing weight per k, and the FP8 scales).

The gathers and reductions around the transfers are in hpc_moe.rowops.

Legend: R rows, W bytes per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RowLayout:
    """Named byte fields of one metadata row: ``fields[i] = (name, offset, nbytes)``; offsets are
    8-byte aligned so that every field can be viewed as its dtype in place."""

    fields: tuple[tuple[str, int, int], ...]
    width: int

    @classmethod
    def of(cls, **nbytes: int) -> RowLayout:
        out, off = [], 0
        for name, n in nbytes.items():
            out.append((name, off, int(n)))
            off += -(-int(n) // 8) * 8
        return cls(tuple(out), max(off, 8))

    def span(self, name: str) -> tuple[int, int]:
        for n, off, size in self.fields:
            if n == name:
                return off, off + size
        raise KeyError(name)

    def pack_into(self, xp, out_RW, **values) -> None:
        """Fill the named fields of uint8 rows ``out_RW`` [R, width] from arrays [R, *] (any dtype)."""
        for name, v in values.items():
            lo, hi = self.span(name)
            out_RW[:, lo:hi] = as_bytes(xp, v)

    def view(self, xp, words_RW, name: str, dtype):
        """Field ``name`` of uint8 rows [R, width] as dtype [R, nbytes / itemsize]. NumPy views it
        in place (the last axis is contiguous); CuPy views need a contiguous copy."""
        lo, hi = self.span(name)
        part = words_RW[:, lo:hi]
        if xp is not np:
            part = xp.ascontiguousarray(part)
        return part.view(dtype)


def as_bytes(xp, a):
    """[R, ...] array -> its uint8 [R, nbytes] view (contiguous first: CuPy views need it)."""
    a = xp.ascontiguousarray(a)
    return a.view(np.uint8).reshape(a.shape[0], int(np.prod(a.shape[1:])) * a.itemsize)
