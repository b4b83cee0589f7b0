"""Outputs: checked before the work that fills them, written atomically (a file that exists is
complete). Paths are the user's: errors name the option and the folder in one line."""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from hpc_moe.errors import InputError


class OutputError(InputError):
    """An output that cannot be written (the message names the option and the folder)."""


def check_output(path: str | None, what: str) -> None:
    """That the file ``path`` can be written, before any work: its folder made if missing, a file
    created and removed in it; what: the option, for the one-line error. None: nothing to check."""
    if not path:
        return
    where = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(where, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where):
            pass
    except OSError as e:
        raise OutputError(f"{what}: cannot write in {where} ({e.strerror})") from None


def write_npz(path: str, **arrays) -> None:
    """Write atomically: a crash never leaves a half-written output."""
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON atomically (a file that exists is complete)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None
