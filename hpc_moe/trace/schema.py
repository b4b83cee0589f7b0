"""The trace format's definitions: schema constants, record dtypes, root attributes, TraceError.

hpc_moe.trace.reader (reading) and hpc_moe.trace.writer (recording) both import from here; the
reader re-exports every name, which is where users find them. docs/trace-format.md is the contract.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hpc_moe.errors import InputError
from hpc_moe.trace.provenance import git_commit, software_version

SCHEMA_NAME = "hpc_moe.trace"
SCHEMA_VERSION = 3  # 3: segments (run --resume) and step end times; 2: exchange records, rank loads, nodes reached
KINDS = ("prefill", "decode", "mixed")
STATES = ("running", "completed", "failed", "stopped")  # a killed writer leaves "running"; stopped: by a signal
EVENT_DTYPE = np.dtype([("step", "<i8"), ("rank", "<i4"), ("layer", "<i4"), ("phase", "<i2"),
                        ("t_start_s", "<f8"), ("t_end_s", "<f8")])
EXCHANGE_DTYPE = np.dtype([("step", "<i8"), ("rank", "<i4"), ("layer", "<i4"), ("micro_batch", "<i2"),
                           ("kind", "i1"), ("t_start_s", "<f8"), ("t_post_s", "<f8"), ("t_done_s", "<f8"),
                           ("blocked_s", "<f8")])
def placement_dtype(maps: int, experts: int, ranks: int) -> np.dtype:
    """A re-placement record: the step it took effect from, the placement (replicas padded to R),
    the experts and bytes that moved to new owners (all ranks), the seconds from posting their
    transfers to done, of those spent posting and blocked waiting for them (the slowest rank's)."""
    return np.dtype([("step", "<i8"), ("placement", "<i4", (maps, experts, ranks)), ("experts_moved", "<i8"),
                     ("bytes_moved", "<i8"), ("fetch_time_s", "<f8"), ("post_time_s", "<f8"),
                     ("wait_time_s", "<f8")])


STATUS_DTYPE = np.dtype([("state", "i1"), ("steps_written", "<i8"), ("elapsed_s", "<f8"),
                         ("end_time_unix", "<f8")])
UNITS = {"rank_tokens": "tokens", "rank_time_s": "s", "nodes_reached": "1", "wall_time_s": "s", "input_tokens": "tokens",
         "output_tokens": "tokens",
         "num_sequences": "sequences", "input_tokens_per_s": "tokens/s",
         "output_tokens_per_s": "tokens/s", "phase_time_s": "s", "expert_tokens": "tokens",
         "bytes_sent": "B", "events": "s", "exchange_time_s": "s", "exchanges": "s", "elapsed_s": "s",
         "end_time_unix": "s", "time_unix": "s"}
RANK_COLUMNS = ("host", "node", "local_rank", "gpu", "device", "machine")  # /layout/rank_<name>


class TraceError(InputError):
    """A trace cannot be written or read; the message is one line naming the file."""


# ------------------------------------------------------------------------------------- root attributes
# Built here for both recorders (hpc_moe.trace.writer) and decoded here into Trace.meta: the attribute
# table of docs/trace-format.md in one place. Keys the run must put in ``meta``; root_attributes
# adds the provenance it can find itself (version, commit, date, command line, Slurm job id).
REQUIRED_META = ("model_config", "run_config", "parallel_config", "mpi_library_version", "transport",
                 "cuda_aware", "array_backend", "truncated")
_OPTIONAL_META = ("command_line", "extra", "links")
_JSON_ATTRS = ("model_config", "run_config", "parallel_config", "hostnames", "device_names", "units",
               "phases", "comm_phases", "extra", "links")


def root_attributes(meta: Mapping[str, Any], ranks: Mapping[str, np.ndarray], *, phases: Sequence[str],
                    comm_phases: Sequence[str], num_layers: int, num_moe_layers: int, num_experts: int) -> dict:
    """The root attributes of a trace, JSON ones as strings (``Trace.meta`` decodes them).

    meta: the REQUIRED_META keys plus optional command_line and extra (hpc_moe.trace.writer documents
    their types); ranks: the /layout/rank_<name> columns [R] (host, node and device are used).
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    unknown = [k for k in meta if k not in REQUIRED_META + _OPTIONAL_META]
    if missing or unknown:
        raise TraceError(f"trace meta: missing keys {missing}, unknown keys {unknown} (put extras in meta['extra'])")
    if not isinstance(meta["cuda_aware"], (bool, np.bool_)) or not isinstance(meta["truncated"], (bool, np.bool_)):
        raise TraceError("trace meta: cuda_aware and truncated must be bools")
    return {
        "schema_name": SCHEMA_NAME, "schema_version": SCHEMA_VERSION,
        "software_version": software_version(), "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "command_line": clean_text(meta.get("command_line") or shlex.join(sys.argv)),
        **{k: _jsonable(meta[k], k) for k in ("model_config", "run_config", "parallel_config")},
        "mpi_library_version": clean_text(meta["mpi_library_version"]),
        "transport": clean_text(meta["transport"]), "cuda_aware": bool(meta["cuda_aware"]),
        "array_backend": clean_text(meta["array_backend"]), "truncated": bool(meta["truncated"]),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "hostnames": json.dumps(list(dict.fromkeys(ranks["host"].tolist()))),
        "device_names": json.dumps(sorted(set(ranks["device"].tolist()))),
        "units": json.dumps(UNITS, sort_keys=True),
        "phases": json.dumps(list(phases)), "comm_phases": json.dumps(list(comm_phases)),
        "num_layers": int(num_layers), "num_moe_layers": int(num_moe_layers), "num_ranks": len(ranks["node"]),
        "num_nodes": int(ranks["node"].max()) + 1, "num_experts": int(num_experts),
        "extra": _jsonable(meta.get("extra") or {}, "extra"),
        "links": _jsonable(meta.get("links") or {}, "links"),
    }


def clean_text(value: Any) -> str:
    """A string from MPI or the host as the trace stores it: without NUL bytes and other control
    characters but newline and tab (Open MPI's library version ends in a NUL, which HDF5's
    variable-length strings refuse), without surrounding blanks."""
    return "".join(c for c in str(value) if c.isprintable() or c in "\n\t").strip()


def _jsonable(value: Any, key: str) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise TraceError(f"meta[{key!r}] must be a dict, a dataclass or a JSON object string")
    return json.dumps(value, sort_keys=True, default=str)


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
