"""``hpc-moe plan``: a deployment before it burns cluster hours: parameters by kind, memory per GPU
item by item and whether it fits (hpc_moe.perf.footprint), and the expert placement."""
from __future__ import annotations

from dataclasses import dataclass

from hpc_moe.apps.common import loads_from_trace, write_json
from hpc_moe.config import load_config
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.errors import UsageError
from hpc_moe.perf.footprint import Layout, Workload, memory_per_gpu, parameter_counts


@dataclass(frozen=True)
class PlanOptions:
    ranks: int
    config: str = "deepseek-v3"
    ranks_per_node: int = 8
    dp: int = 1
    expert_tp: int = 1
    loads_from: str | None = None
    layers: int | None = None
    experts_dtype: str = "auto"
    sequences: int = 8
    context: int = 4096
    tokens: int = 4096
    hbm_gib: float = 80.0
    placement: bool = False
    json: str | None = None


def run_plan(o: PlanOptions) -> int:
    cfg = load_config(o.config)
    if o.ranks % o.dp or (o.ranks // o.dp) % o.expert_tp:
        raise UsageError(f"--ranks {o.ranks} must be divisible by --dp {o.dp} and the EP group by "
                         f"--expert-tp {o.expert_tp}")
    ep, layers = o.ranks // o.dp, o.layers or cfg.num_hidden_layers
    loads = loads_from_trace(o.loads_from, layers, cfg).mean(axis=0) if o.loads_from else None
    p = ExpertPlacement.build(cfg.n_routed_experts, ep, o.expert_tp, [r // o.ranks_per_node for r in range(ep)],
                              cfg.n_group, loads=loads)
    params = parameter_counts(cfg, layers)
    mem = memory_per_gpu(cfg, Layout(ep, o.dp, o.expert_tp, o.ranks_per_node), Workload(o.sequences, o.context, o.tokens),
                         expert_dtype=o.experts_dtype, layers=layers)
    hbm = o.hbm_gib * 2**30
    per_seq = mem["kv_cache"] / o.sequences
    most = max(0, int((hbm - (mem["total"] - mem["kv_cache"])) // per_seq)) if per_seq else 0
    print(f"{o.config}: {layers} of {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts (top-"
          f"{cfg.num_experts_per_tok}); {o.ranks} GPUs: EP {ep} x DP {o.dp}, expert TP {o.expert_tp}, "
          f"{o.ranks_per_node} per node")
    print(f"\nparameters (billions)  {'total':>10} {'activated/token':>16}")
    for kind, v in params.items():
        print(f"  {kind:<21}{v['total'] / 1e9:>10.3f} {v['activated'] / 1e9:>16.3f}")
    print(f"\nmemory per GPU (GiB), {o.sequences} sequences of {o.context} positions, {o.tokens} tokens a layer")
    for item, v in mem.items():
        print(f"  {item:<21}{v / 2**30:>10.2f}")
    print(f"  {'fits in':<21}{o.hbm_gib:>10.2f}: {'yes' if mem['total'] <= hbm else 'NO'}; "
          f"at most {most} sequences of {o.context} per GPU")
    if p.colocated:
        print("\nnote: more experts than slots: ranks hold several experts per layer "
              "(breaks the one-expert-per-GPU principle)")
    if o.placement:
        print("\n" + p.format())
    if o.json:
        write_json(o.json, {"params_total": params["all"]["total"], "params_activated": params["all"]["activated"],
                            "params": params, "memory_per_gpu_bytes": mem, "fits": bool(mem["total"] <= hbm),
                            "max_sequences_per_gpu": most, "hbm_bytes": hbm})
    return 0
