"""Baseline: one expert-parallel MoE layer forward written directly with torch.distributed (gloo).

This is what a user would write themselves, to compare against ``hpc-moe bench layer``:
Megatron-style dispatch with ``dist.all_to_all_single`` on CPU tensors over gloo.

Per rank: x_TD random tokens; gate logits = x @ Wg.T, sigmoid scores; the top-k experts by score
plus the gate's correction bias (DeepSeek-V3's rule), weights the unbiased scores normalised to
sum 1. The T*K (token, expert) rows are stably sorted by expert id (so they are
grouped by destination rank, expert e lives on rank e // (E / world)); one small all_to_all_single
exchanges the per-(rank, local expert) row counts, one all_to_all_single moves the rows. Each rank
regroups the received rows by local expert, runs one SwiGLU GEMM chain per local expert
(gate and up projections fused into one GEMM), sends the rows back with the split sizes swapped,
un-permutes and sums over k with the routing weights.

The inputs are those of ``hpc-moe bench layer`` with the same flags: the weights of its layer
config from hpc_moe's synthetic weights (a tensor from a generator seeded by its name), the tokens
of rank r from np.random.default_rng([seed, r]). Both therefore route every token to the same
experts, and the expert loads (which set the slowest rank) are the same. Each rank builds only
its own experts.

Run (from the checkout root; several ranks may share few cores):

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/mpiexec -n 8 \\
        .venv/bin/python scripts/torch_moe_layer.py --tokens 128 --hidden 7168 --experts 8 --topk 2 \\
        --inter 256 --iters 20 --warmup 3 --json out.json

Add ``--check`` to compare the distributed result against a dense single-process reference on
every rank and exit (0 ok, 1 mismatch). Exit 2 if torch.distributed cannot be initialised.

Timings: every iteration starts after a dist.barrier(); each rank times the phases gate
(gate + topk + permute), dispatch (count exchange + row all_to_all), expert, combine
(all_to_all back + un-permute + weighted sum) and the whole layer with time.perf_counter; the
per-iteration maximum over ranks is taken and medians are reported. floor_ms is a raw
all_to_all_single of exactly the dispatch and combine row splits with ready buffers
(dispatch floor + combine floor, medians of the per-iteration max over ranks).
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hpc_moe.apps.bench_layer import layer_config
from hpc_moe.apps.bench_options import BenchLayerOptions
from hpc_moe.weights.synthetic import SyntheticWeights

IMPL = "torch.distributed all_to_all_single (gloo)"
PHASES = ("gate", "dispatch", "expert", "combine")
CHECK_TOL = 1e-5
STORE_TIMEOUT = datetime.timedelta(seconds=30)  # rendezvous: every rank is already up (past an MPI bcast)
PG_TIMEOUT = datetime.timedelta(seconds=120)  # any gloo collective


def parse_args():
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--inter", type=int, default=256, help="moe intermediate size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--dtype", choices=["float32"], default="float32")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="rank 0 writes the results here")
    p.add_argument("--check", action="store_true", help="verify against a dense reference and exit")
    return p.parse_args()


def init_dist(comm):
    """Init the gloo process group on a TCPStore at rank 0's host, on a free port rank 0 picks and
    broadcasts (the host by name, so that ranks on other nodes reach it; gloo then finds each rank's
    interface from its own host name).

    Returns True on every rank or False on every rank (after printing one line).
    """
    rank, world = comm.Get_rank(), comm.Get_size()
    store, port, err = None, None, None
    host = comm.bcast(socket.gethostname() if rank == 0 else None, root=0)
    if rank == 0:
        try:
            store = dist.TCPStore(host, 0, world, is_master=True, timeout=STORE_TIMEOUT, wait_for_workers=False)
            port = store.port
        except Exception as e:
            err = e
    port = comm.bcast(port, root=0)
    if port is not None:
        try:
            if store is None:
                store = dist.TCPStore(host, port, world, is_master=False, timeout=STORE_TIMEOUT)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=PG_TIMEOUT)
        except Exception as e:
            err = e
    ok = comm.allreduce(int(port is not None and err is None), op=MPI.MIN)
    if not ok:
        if err is not None or rank == 0:
            print(f"rank {rank}: torch.distributed gloo init failed: {err!r}", flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
    return bool(ok)


def weights(args) -> SyntheticWeights:
    """The weights of hpc-moe bench layer's one-layer config for these flags."""
    o = BenchLayerOptions(tokens=args.tokens, hidden=args.hidden, inter=args.inter, experts=args.experts,
                          topk=args.topk, seed=args.seed)
    return SyntheticWeights(layer_config(o), args.seed)


def make_gate(w: SyntheticWeights):
    """Gate weight Wg [E, D] and correction bias [E]."""
    p = "model.layers.0.mlp.gate"
    return torch.from_numpy(w.get(f"{p}.weight")), torch.from_numpy(w.get(f"{p}.e_score_correction_bias"))


def make_expert(w: SyntheticWeights, e):
    """Expert e's SwiGLU weights: fused gate/up [2I, D] (gate rows first) and down [D, I]."""
    p = f"model.layers.0.mlp.experts.{e}"
    gate, up, down = (w.get(f"{p}.{n}_proj.weight") for n in ("gate", "up", "down"))
    return torch.from_numpy(np.concatenate([gate, up])), torch.from_numpy(np.ascontiguousarray(down))


def make_tokens(args, r):
    """Tokens x [T, D] of rank r."""
    return torch.from_numpy(np.random.default_rng([args.seed, r]).standard_normal((args.tokens, args.hidden),
                                                                                  np.float32))


def swiglu(x_ND, w_gate_up_2ID, w_down_DI):
    """down(silu(gate(x)) * up(x)) with the gate and up projections in one GEMM."""
    g_NI, u_NI = F.linear(x_ND, w_gate_up_2ID).chunk(2, dim=-1)
    return F.linear(F.silu(g_NI) * u_NI, w_down_DI)


def route(x_TD, gate, topk):
    """Top-k routing: expert ids [T, K] by sigmoid score + bias, weights [T, K] (the unbiased scores
    normalised per token). gate: (Wg [E, D], bias [E])."""
    w_gate_ED, bias_E = gate
    scores_TE = torch.sigmoid(F.linear(x_TD, w_gate_ED))
    topk_idx_TK = torch.topk(scores_TE + bias_E, topk, dim=-1).indices
    topk_score_TK = scores_TE.gather(1, topk_idx_TK)
    return topk_idx_TK, topk_score_TK / topk_score_TK.sum(-1, keepdim=True)


def gate_and_permute(x_TD, gate, topk, num_experts):
    """Route, then sort the T*K rows by expert id (N = T*K).

    Returns the permuted rows x_ND, the inverse permutation, the routing weights and the
    number of rows per expert.
    """
    topk_idx_TK, topk_w_TK = route(x_TD, gate, topk)
    expert_N = topk_idx_TK.flatten()
    perm_N = torch.argsort(expert_N, stable=True)
    inv_perm_N = torch.empty_like(perm_N)
    inv_perm_N[perm_N] = torch.arange(perm_N.numel())
    x_ND = x_TD.index_select(0, perm_N // topk)
    counts_E = torch.bincount(expert_N, minlength=num_experts)
    return x_ND, inv_perm_N, topk_w_TK, counts_E


def dispatch(x_ND, counts_E, world):
    """Exchange the row counts per (rank, local expert), then the rows themselves.

    Returns the received rows x_MD (M rows, ordered by source rank, then local expert), the
    received counts [world, E_local] and the send/recv split sizes.
    """
    recv_counts_E = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_counts_E, counts_E)
    send_splits = counts_E.view(world, -1).sum(1).tolist()
    recv_counts_WL = recv_counts_E.view(world, -1)
    recv_splits = recv_counts_WL.sum(1).tolist()
    x_MD = x_ND.new_empty((sum(recv_splits), x_ND.shape[1]))
    dist.all_to_all_single(x_MD, x_ND, recv_splits, send_splits)
    return x_MD, recv_counts_WL, send_splits, recv_splits


def run_experts(x_MD, recv_counts_WL, local_experts):
    """Apply each local expert to its rows: regroup by local expert (when more than one), one
    SwiGLU per contiguous block, restore the (source rank, local expert) order."""
    n_local = len(local_experts)
    if n_local > 1:
        local_id_M = torch.arange(n_local).repeat(recv_counts_WL.shape[0]).repeat_interleave(recv_counts_WL.flatten())
        order_M = torch.argsort(local_id_M, stable=True)
        x_MD = x_MD.index_select(0, order_M)
    y_MD = torch.empty_like(x_MD)
    start = 0
    for n, (w_gate_up_2ID, w_down_DI) in zip(recv_counts_WL.sum(0).tolist(), local_experts):
        if n:
            y_MD[start : start + n] = swiglu(x_MD[start : start + n], w_gate_up_2ID, w_down_DI)
        start += n
    if n_local > 1:
        y_MD = torch.empty_like(y_MD).index_copy_(0, order_M, y_MD)
    return y_MD


def combine(y_MD, send_splits, recv_splits, inv_perm_N, topk_w_TK):
    """Send the expert outputs back, un-permute and sum over k with the routing weights."""
    T, K = topk_w_TK.shape
    y_ND = y_MD.new_empty((T * K, y_MD.shape[1]))
    dist.all_to_all_single(y_ND, y_MD, send_splits, recv_splits)
    y_TKD = y_ND.index_select(0, inv_perm_N).view(T, K, -1)
    return torch.bmm(topk_w_TK.unsqueeze(1), y_TKD).squeeze(1)


def moe_forward(x_TD, gate, local_experts, args, world, clock=None):
    """One distributed MoE layer forward; if clock is a list, phase end times are appended."""
    stamp = clock.append if clock is not None else (lambda _t: None)
    x_ND, inv_perm_N, topk_w_TK, counts_E = gate_and_permute(x_TD, gate, args.topk, args.experts)
    stamp(time.perf_counter())
    x_MD, recv_counts_WL, send_splits, recv_splits = dispatch(x_ND, counts_E, world)
    stamp(time.perf_counter())
    y_MD = run_experts(x_MD, recv_counts_WL, local_experts)
    stamp(time.perf_counter())
    out_TD = combine(y_MD, send_splits, recv_splits, inv_perm_N, topk_w_TK)
    stamp(time.perf_counter())
    return out_TD


def dense_reference(x_TD, gate, args):
    """Single-process reference with every expert: out[t] = sum_k w[t, k] * expert_{idx[t, k]}(x[t])."""
    topk_idx_TK, topk_w_TK = route(x_TD, gate, args.topk)
    out_TD = torch.zeros_like(x_TD)
    for e in range(args.experts):
        w_T = (topk_w_TK * (topk_idx_TK == e)).sum(-1)
        rows = w_T.nonzero().flatten()
        if rows.numel():
            out_TD[rows] += w_T[rows, None] * swiglu(x_TD[rows], *make_expert(weights(args), e))
    return out_TD


def max_over_ranks(times):
    """Per-row max over ranks of a list of per-iteration timing rows (seconds)."""
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def median_ms(col):
    """Median of a tensor column of seconds, in ms."""
    return statistics.median(col.tolist()) * 1e3


def time_layer(x_TD, gate, local_experts, args, world):
    """Per-iteration [gate, dispatch, expert, combine, layer] seconds, max over ranks."""
    rows = []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        clock = [time.perf_counter()]
        moe_forward(x_TD, gate, local_experts, args, world, clock)
        if i >= args.warmup:
            rows.append([b - a for a, b in zip(clock, clock[1:])] + [clock[-1] - clock[0]])
    return max_over_ranks(rows)


def time_floor(x_TD, gate, args, world):
    """Per-iteration [dispatch, combine] seconds of bare all_to_all_single on the layer's row splits."""
    x_ND, _, _, counts_E = gate_and_permute(x_TD, gate, args.topk, args.experts)
    x_MD, _, send_splits, recv_splits = dispatch(x_ND, counts_E, world)
    y_ND = torch.empty_like(x_ND)
    rows = []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_to_all_single(x_MD, x_ND, recv_splits, send_splits)
        t1 = time.perf_counter()
        dist.barrier()
        t2 = time.perf_counter()
        dist.all_to_all_single(y_ND, x_MD, send_splits, recv_splits)
        t3 = time.perf_counter()
        if i >= args.warmup:
            rows.append([t1 - t0, t3 - t2])
    return max_over_ranks(rows)


def check(comm, x_TD, gate, local_experts, args, world):
    """Compare the distributed layer with the dense reference on every rank; return the exit code."""
    out_TD = moe_forward(x_TD, gate, local_experts, args, world)
    ref_TD = dense_reference(x_TD, gate, args)
    err = ((out_TD - ref_TD).abs().max() / ref_TD.abs().max()).item()
    errs = comm.gather(err, root=0)
    ok = comm.allreduce(int(err <= CHECK_TOL), op=MPI.MIN)
    if comm.Get_rank() == 0:
        for r, e in enumerate(errs):
            status = "ok" if e <= CHECK_TOL else "FAILED"
            print(f"check {status}: rank {r} max rel err {e:.3e} (tol {CHECK_TOL:.0e})")
    return 0 if ok else 1


def report(layer_t, floor_t, args, world):
    """Rank 0: print the table and build the JSON result."""
    phases_ms = {p: median_ms(layer_t[:, i]) for i, p in enumerate(PHASES)}
    floor_parts = {"dispatch": median_ms(floor_t[:, 0]), "combine": median_ms(floor_t[:, 1])}
    result = {
        "impl": IMPL,
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("json", "check")},
            "world_size": world,
            "torch": torch.__version__,
        },
        "layer_ms": median_ms(layer_t[:, len(PHASES)]),
        "phases_ms": phases_ms,
        "floor_ms": floor_parts["dispatch"] + floor_parts["combine"],
        "floor_phases_ms": floor_parts,
        "iters": args.iters,
    }
    print(f"{IMPL}: world {world}, T={args.tokens} D={args.hidden} I={args.inter} E={args.experts} K={args.topk}")
    print(f"{'phase':<10}{'median ms':>12}")
    for p, v in phases_ms.items():
        print(f"{p:<10}{v:>12.3f}")
    print(f"{'layer':<10}{result['layer_ms']:>12.3f}")
    print(
        f"{'floor':<10}{result['floor_ms']:>12.3f}"
        f"  (a2a dispatch {floor_parts['dispatch']:.3f} + combine {floor_parts['combine']:.3f})"
    )
    return result


def main():
    """Entry point under mpiexec."""
    args = parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    if args.experts % world:
        if rank == 0:
            print(f"--experts {args.experts} must be a multiple of the world size {world}")
        return 2
    if not init_dist(comm):
        return 2
    per_rank = args.experts // world
    w = weights(args)
    local_experts = [make_expert(w, e) for e in range(rank * per_rank, (rank + 1) * per_rank)]
    gate = make_gate(w)  # (Wg [E, D], bias [E])
    x_TD = make_tokens(args, rank)
    try:
        if args.check:
            return check(comm, x_TD, gate, local_experts, args, world)
        layer_t = time_layer(x_TD, gate, local_experts, args, world)
        floor_t = time_floor(x_TD, gate, args, world)
        if rank == 0:
            result = report(layer_t, floor_t, args, world)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=2)
                    f.write("\n")
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
