"""Plain-text formatting shared by the report's tables (hpc_moe.trace.report, hpc_moe.trace.resumed)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table; first column left-aligned, the others right-aligned."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def fmt_num(x: float, digits: int = 0) -> str:
    """x with thousands separators, "-" when not finite."""
    return "-" if not np.isfinite(x) else f"{x:,.{digits}f}"


def fmt_bytes(n: float) -> str:
    """n bytes in the largest decimal unit it reaches (kB, MB, GB, TB)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f} B"
