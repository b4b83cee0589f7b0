"""The checks of what the recorders are given (hpc_moe.trace.writer): one line naming what is wrong.

Shape legend: M MoE layers, E experts, K replicas, R ranks.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from hpc_moe.trace.reader import TraceError, clean_text


def as_checked(value, name: str, spec: tuple) -> np.ndarray:
    """value as an array of spec = (dtype, shape), finite and >= 0 (ints must come as ints)."""
    dtype, shape = spec
    a = np.asarray(value)
    if a.shape != shape:
        raise TraceError(f"{name} has shape {a.shape}, expected {shape}")
    if np.dtype(dtype).kind == "i" and a.dtype.kind not in "iu":
        raise TraceError(f"{name} must be integers, got dtype {a.dtype}")
    a = a.astype(dtype, copy=False)
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise TraceError(f"{name} must be finite and >= 0")
    return a


def check_moe_layers(moe_layers: Sequence[int], num_layers: int) -> np.ndarray:
    ids = np.array(moe_layers, dtype=np.int64).reshape(-1)
    if num_layers < 1 or np.any(np.diff(ids) <= 0) or (ids.size and not 0 <= ids[0] <= ids[-1] < num_layers):
        raise TraceError(f"moe_layers must be ascending layer ids in [0, {num_layers}), got {ids.tolist()}")
    return ids


def check_placement(placement: np.ndarray, num_moe: int, num_ranks: int) -> np.ndarray:
    p = np.asarray(placement)
    if p.ndim != 3 or p.shape[0] not in (1, num_moe) or p.dtype.kind not in "iu" or p.shape[1] < 1:
        raise TraceError(f"placement must be int [1 or {num_moe}, experts, replicas], got {p.dtype} {p.shape}")
    if num_ranks < 1 or p.min() < -1 or p.max() >= num_ranks or np.any(p[..., 0] < 0):
        raise TraceError(f"placement ranks must lie in [0, {num_ranks}) with -1 padding after replica 0")
    return p.astype(np.int32)


def rank_columns(rank_map: Sequence[Mapping]) -> dict[str, np.ndarray]:
    try:
        host = [clean_text(r["host"]) for r in rank_map]
        hosts = list(dict.fromkeys(host))  # without "node": node ids in order of first appearance
        node = np.array([int(r.get("node", hosts.index(h))) for r, h in zip(rank_map, host)], np.int32)
        gpu = np.array([int(r["gpu"]) for r in rank_map], np.int32)
        device = np.array([clean_text(r["device"]) for r in rank_map])
        machine = np.array([clean_text(r.get("machine", h)) for r, h in zip(rank_map, host)])
    except (KeyError, TypeError, ValueError) as e:
        raise TraceError(f"rank_map entries need host (str), gpu (int), device (str): {e!r}") from None
    local = np.array([int(np.sum(node[:r] == node[r])) for r in range(len(node))], np.int32)
    return {"host": np.array(host), "node": node, "local_rank": local, "gpu": gpu, "device": device,
            "machine": machine}
