"""hpc_moe's placements against DeepSeek's own EPLB (``eplb.py`` of github.com/deepseek-ai/EPLB, MIT,
run as published from the path given; nothing is downloaded and nothing of it enters hpc_moe) on
the loads an earlier ``hpc-moe run`` measured.

For one layout (experts of the config, --ranks in nodes of --ranks-per-node, --redundant-experts
replicas beyond one per expert when experts are colocated) it prints the rank load max/mean (the
hottest GPU's rows over the mean) per MoE layer and the mean over layers of: (a) DeepSeek's
hierarchical and global policies with each expert's load split evenly over its replicas, as
eplb.py models it and a DeepSeek-style engine routes; (b) the same two placements with the shares
hpc_moe's router gives replicas (hpc_moe.ep.packing.replica_shares); every hpc_moe policy on both
models; and (c) ``--eplb auto`` (the policy the planner's cost model picks, as ``hpc-moe run``
picks it, routed by its own shares), with the candidates' table; then one Markdown row for
docs/benchmarks.md (its last two columns: auto against the better of (a) and of (b)).

    python scripts/eplb_compare.py --eplb-py /path/to/EPLB/eplb.py --loads-from a.h5 \\
        --config scripts/eplb/tiny-e12.json --ranks 16 --ranks-per-node 4

Needs torch (the published eplb.py is torch code); test-only, not part of the package.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

import numpy as np

from hpc_moe.config import load_config
from hpc_moe.ep.placement import POLICIES, ExpertPlacement
from hpc_moe.perf.balance import best, candidates, format_candidates
from hpc_moe.perf.footprint import Layout
from hpc_moe.perf.hardware import load_hardware
from hpc_moe.trace.reader import read_trace


def deepseek(eplb, loads_ME: np.ndarray, n_phys: int, groups: int, nodes: int, gpus: int, hierarchical: bool,
             cfg, layers):
    """-> (float [M] rank load max/mean of DeepSeek's policy with each expert's load split evenly
    over its replicas, as eplb.py models it and a DeepSeek-style engine routes; float [M] the same
    placement with hpc_moe's replica shares, as hpc_moe's router would send the tokens), or None
    where the policy's preconditions fail."""
    import torch
    if hierarchical and groups % nodes:
        return None
    w = torch.tensor(loads_ME, dtype=torch.float32)
    phy2log, _, logcnt = eplb.rebalance_experts_hierarchical(w, n_phys, groups if hierarchical else 1,
                                                             nodes if hierarchical else 1, gpus)
    per_phys = (w.gather(-1, phy2log) / logcnt.gather(-1, phy2log).float()).numpy()  # [M, n_phys]
    per_gpu = per_phys.reshape(len(loads_ME), gpus, -1).sum(-1)
    maps = tuple(tuple(tuple(sorted(int(e) for e in row)) for row in m.reshape(gpus, -1)) for m in phy2log.numpy())
    rpn = gpus // nodes
    p = ExpertPlacement(cfg.n_routed_experts, gpus, 1, tuple(r // rpn for r in range(gpus)), cfg.n_group, maps,
                        tuple(layers), "global", loads=tuple(np.asarray(loads_ME, np.float64) + 1e-9))
    routed = np.array([(s.max() / s.mean()) for s in (p.routed_loads(x, layer) for layer, x in zip(layers, loads_ME))])
    return per_gpu.max(-1) / per_gpu.mean(-1), routed


def ours(cfg, loads_ME, ranks, rpn, redundant, policy, layers, routed: bool):
    """float [M]: rank load max/mean of an hpc_moe policy, with each expert's load split evenly over
    its replicas (EPLB's model) or as choose_replica sends the tokens (routed)."""
    p = ExpertPlacement.build(cfg.n_routed_experts, ranks, 1, [r // rpn for r in range(ranks)], cfg.n_group,
                              loads=loads_ME, layers=layers, policy=policy, redundant=redundant)
    out = []
    for layer, loads_E in zip(layers, loads_ME):
        s = p.routed_loads(loads_E, layer) if routed else p.slot_loads(loads_E, layer)
        out.append(s.max() / s.mean())
    return np.array(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eplb-py", required=True, help="DeepSeek's eplb.py (a checkout of deepseek-ai/EPLB)")
    ap.add_argument("--loads-from", required=True, help="a trace of hpc-moe run: its mean tokens per expert")
    ap.add_argument("--config", required=True)
    ap.add_argument("--ranks", type=int, required=True)
    ap.add_argument("--ranks-per-node", type=int, required=True)
    ap.add_argument("--redundant-experts", type=int, default=0)
    ap.add_argument("--hardware", default="cpu-2core", help="what --eplb auto prices the placements on")
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("deepseek_eplb", a.eplb_py)
    eplb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eplb)
    cfg = load_config(a.config)
    t = read_trace(a.loads_from)
    loads = t.expert_tokens.mean(axis=0).astype(np.float64)
    layers = [int(x) for x in t.moe_layers]
    E, ranks, rpn, nodes = cfg.n_routed_experts, a.ranks, a.ranks_per_node, a.ranks // a.ranks_per_node
    n_phys = max(ranks, E + a.redundant_experts)
    if n_phys % ranks:
        print(f"DeepSeek's eplb.py needs physical experts ({n_phys}) divisible by the GPUs ({ranks})", file=sys.stderr)
        return 2
    rows = {}
    for name, hier in (("hierarchical", True), ("global", False)):
        got = deepseek(eplb, loads, n_phys, cfg.n_group, nodes, ranks, hier, cfg, layers)
        rows[f"DeepSeek {name}"] = None if got is None else got[0]
        rows[f"DeepSeek {name}, hpc_moe's shares"] = None if got is None else got[1]
    for policy in POLICIES:
        rows[f"hpc_moe {policy}"] = ours(cfg, loads, ranks, rpn, a.redundant_experts, policy, layers, False)
    for policy in POLICIES:
        rows[f"hpc_moe {policy}, routed"] = ours(cfg, loads, ranks, rpn, a.redundant_experts, policy, layers, True)
    synthetic = t.meta.get("run_config", {}).get("routing", "model") != "model"
    cands = candidates(cfg, load_hardware(a.hardware), Layout(ranks, 1, 1, rpn), [r // rpn for r in range(ranks)],
                       loads, layers=layers, tokens=max(1.0, loads.sum(1).mean() / cfg.num_experts_per_tok / ranks),
                       dispatch="hierarchical" if 1 < nodes < ranks else "flat",
                       model_layers=max(layers) + 1, redundant=a.redundant_experts, group_limited=not synthetic)
    chosen = best(cands)
    rows[f"hpc_moe --eplb auto ({chosen.policy}), routed"] = ours(cfg, loads, ranks, rpn, a.redundant_experts,
                                                                  chosen.policy, layers, True)
    print(f"{a.config}: {E} experts in {cfg.n_group} groups, {ranks} ranks in {nodes} nodes, {n_phys} physical "
          f"experts; loads of {a.loads_from} ({t.meta.get('run_config', {}).get('routing')}), layers {layers}")
    print("rank load max/mean: the hottest rank's rows over the mean; DeepSeek's and hpc_moe's placements with each "
          "expert's load split evenly over its replicas (EPLB's model), and ', routed': as hpc_moe's choose_replica "
          "sends the tokens")
    print(f"{'placement':<60}{'mean':>7}  per MoE layer")
    for name, r in rows.items():
        print(f"{name:<60}" + ("    n/a  (groups not divisible by nodes)" if r is None else
                               f"{r.mean():>7.3f}  " + " ".join(f"{x:.3f}" for x in r)))
    def mean(key):
        return None if rows[key] is None else float(rows[key].mean())
    even = [mean(f"DeepSeek {k}") for k in ("hierarchical", "global")]
    shared = [mean(f"DeepSeek {k}, hpc_moe's shares") for k in ("hierarchical", "global")]
    rule = even[0] if cfg.n_group % nodes == 0 else even[1]  # what eplb.rebalance_experts itself runs
    auto = mean(f"hpc_moe --eplb auto ({chosen.policy}), routed")
    best_even, best_shared = min(x for x in even if x is not None), min(x for x in shared if x is not None)
    print(f"--eplb auto: {chosen.policy}, predicted step {chosen.step_ms:.3f} ms; every candidate:")
    print(format_candidates(cands, chosen))

    def cell(x):
        return "n/a" if x is None else f"{x:.3f}"
    print(f"| {E} experts, {cfg.n_group} groups, {ranks} ranks / {nodes} nodes, {n_phys} physical | "
          f"{cell(even[0])} | {cell(even[1])} | {cell(rule)} | {cell(shared[0])} | {cell(shared[1])} | {chosen.policy} | "
          f"{auto:.3f} | {100 * (auto / best_even - 1):+.1f} % | {100 * (auto / best_shared - 1):+.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
