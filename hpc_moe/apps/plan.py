"""``hpc-moe plan``: a deployment before it burns cluster hours: parameters by kind, memory per GPU
item by item and whether it fits (hpc_moe.perf.footprint), the expert placement, and the predicted
prefill and decode step per phase on a hardware file (hpc_moe.perf.predict); ``--sweep-ep`` tabulates
and plots the prediction over EP sizes and decode batches."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from hpc_moe.apps.common import hardware_of, loads_from_trace
from hpc_moe.apps.options import PlanOptions
from hpc_moe.apps.workload import Workload
from hpc_moe.config import ModelConfig, load_config
from hpc_moe.ep.placement import POLICIES, ExpertPlacement
from hpc_moe.errors import UsageError
from hpc_moe.outputs import check_output, write_json
from hpc_moe.perf.balance import Candidate, best, candidates, format_candidates
from hpc_moe.perf.footprint import GpuLoad, Layout, memory_per_gpu, parameter_counts
from hpc_moe.perf.hardware import Hardware
from hpc_moe.perf.predict import predict_step
from hpc_moe.trace.reader import read_trace


@dataclass(frozen=True)
class _Plan:
    """One layout's figures: placement, memory and its fit, the prefill and decode predictions."""

    ep: int
    sequences: int
    ranks_per_node: int
    hbm_bytes: float
    placement: ExpertPlacement
    memory: dict
    fits: bool
    most_sequences: int
    dispatch: str
    imbalance: float
    predicted: dict
    candidates: list[Candidate] | None = None  # with loads: every policy's placement and price
    chosen: Candidate | None = None


def _plan(cfg: ModelConfig, hw: Hardware, o: PlanOptions, ep: int, sequences: int, loads_ME,
          group_limited: bool = True) -> _Plan:
    if ep % o.expert_tp:
        raise UsageError(f"the EP group of {ep} ranks must be divisible by --expert-tp {o.expert_tp}")
    rpn, layers = o.ranks_per_node or hw.gpus_per_node, o.layers or cfg.num_hidden_layers
    layout = Layout(ep, o.dp, o.expert_tp, rpn)
    mem = memory_per_gpu(cfg, layout, GpuLoad(sequences, o.context, o.tokens), expert_dtype=o.experts_dtype,
                         layers=layers)
    hbm = o.hbm_gib * 2**30 if o.hbm_gib else hw.hbm_bytes
    per_seq = mem["kv_cache"] / sequences
    most = max(0, int((hbm - (mem["total"] - mem["kv_cache"])) // per_seq)) if per_seq else 0
    dispatch = o.dispatch if o.dispatch != "auto" else ("hierarchical" if ep > rpn else "flat")
    fp8 = o.experts_dtype == "fp8" or (o.experts_dtype == "auto" and cfg.quantization_config is not None)
    node_of_rank = [r // rpn for r in range(ep)]
    cands = chosen = traffic = None
    if loads_ME is None:
        p = ExpertPlacement.build(cfg.n_routed_experts, ep, o.expert_tp, node_of_rank, cfg.n_group)
        imbalance = 1.0
    else:  # every policy priced by the step it predicts (prefill's, or decode's when the run decodes)
        cands = candidates(cfg, hw, layout, node_of_rank, loads_ME,
                           layers=[i for i in range(layers) if cfg.is_moe_layer(i)],
                           tokens=o.tokens, mode="decode" if o.mode == "decode" else "prefill", sequences=sequences,
                           context=o.context, dispatch=dispatch, expert_fp8=fp8, micro_batches=o.micro_batches,
                           model_layers=layers, payload=o.payload, policies=POLICIES if o.eplb == "auto" else (o.eplb,),
                           group_limited=group_limited)
        chosen = best(cands)
        p, imbalance, traffic = chosen.placement, chosen.rank_load, chosen.traffic
    pred = {mode: predict_step(cfg, layout, hw, mode=mode, tokens=o.tokens, sequences=sequences, context=o.context,
                               expert_fp8=fp8, dispatch=dispatch, micro_batches=o.micro_batches,
                               imbalance=imbalance, layers=layers, payload=o.payload,
                               attention=o.attention, traffic=traffic)
            for mode in ("prefill", "decode")}
    return _Plan(ep, sequences, rpn, hbm, p, mem, bool(mem["total"] <= hbm), most, dispatch, imbalance, pred,
                 cands, chosen)


def _with_nics(hw: Hardware, nics: int | None) -> Hardware:
    """The hardware with its node's inter-node bandwidth that of ``nics`` NICs shared by its GPUs
    (the file's inter-node link is one NIC's, one per GPU)."""
    if nics is None:
        return hw
    link = replace(hw.inter_node, bytes_per_s=hw.inter_node.bytes_per_s * nics / hw.gpus_per_node)
    return replace(hw, name=f"{hw.name}, {nics} NICs a node", inter_node=link)


# What --calibrate / --validate use; every other option describes a layout, which the traces give.
_CALIBRATION_OPTIONS = {"calibrate", "validate", "save", "hardware", "loads_from", "json", "links_from"}


def run_plan(o: PlanOptions) -> int:
    for path, what in ((o.json, "--json"), (o.sweep_plot, "--sweep-plot"), (o.save, "--save")):
        check_output(path, what)
    if o.calibrate or o.validate:
        unused = [f"--{f.name.replace('_', '-')}" for f in fields(o)
                  if f.name not in _CALIBRATION_OPTIONS and getattr(o, f.name) != f.default]
        if unused:
            raise UsageError(f"--calibrate / --validate take the layout and workload from the traces: "
                             f"drop {', '.join(unused)}")
        from hpc_moe.apps.calibrate import run_calibrate
        return run_calibrate(o)
    if o.save:
        raise UsageError("--save needs --calibrate")
    cfg = load_config(o.config)
    hw = _with_nics(hardware_of(o.hardware, o.links_from), o.nics_per_node)
    if o.ranks is None and not o.sweep_ep:
        raise UsageError("plan needs --ranks N or --sweep-ep LIST")
    the_run = None
    if o.mode is not None or o.overlap is not None:
        if o.ranks is None:
            raise UsageError("--mode / --overlap plan one run: give --ranks N (not --sweep-ep)")
        o, the_run = _the_run(o, cfg)
    if o.ranks is not None and o.ranks % o.dp:
        raise UsageError(f"--ranks {o.ranks} must be divisible by --dp {o.dp}")
    if o.sweep_plot and not o.sweep_ep:
        raise UsageError("--sweep-plot needs --sweep-ep")
    layers = o.layers or cfg.num_hidden_layers
    loads = loads_from_trace(o.loads_from, layers, cfg) if o.loads_from else None
    # Loads measured under synthetic routing come from draws that ignore the routing groups.
    limited = not o.loads_from or read_trace(o.loads_from).meta.get("run_config", {}).get("routing", "model") == "model"
    if o.sweep_ep:
        return _sweep(cfg, hw, o, loads, limited)
    return _report(cfg, hw, o, _plan(cfg, hw, o, o.ranks // o.dp, o.sequences, loads, limited), the_run)


def _the_run(o: PlanOptions, cfg: ModelConfig) -> tuple[PlanOptions, dict | None]:
    """The `hpc-moe run` that --mode, --batch, --seq-len, --prefill-fraction, --steps, --warmup,
    --seed and --overlap describe, on --ranks ranks: plan's per-GPU figures for its busiest GPU
    (sequences, context, tokens through a layer), and what the run will record per measured step
    (the same seed draws the same steps: means over them)."""
    micro = {None: o.micro_batches, "off": 1, "on": o.micro_batches if o.micro_batches > 1 else 2}[o.overlap]
    o = replace(o, micro_batches=micro)
    if o.mode is None:
        return o, None
    w = Workload.create(o.mode, o.batch, o.seq_len, o.prefill_fraction, o.seed, cfg.max_position_embeddings)
    steps = w.steps(o.warmup + o.steps)[o.warmup:]
    pre = [len(s.prefill_lens) for s in steps]
    ctx = np.concatenate([s.decode_ctx for s in steps])
    tin, tout = (float(np.mean([getattr(s, k) for s in steps])) for k in ("input_tokens", "output_tokens"))
    r = o.ranks
    n_pre, n_dec = float(np.mean(pre)), len(ctx) / len(steps)
    prompt = tin / n_pre if n_pre else 0.0
    decode_ctx = float(ctx.mean()) + 1 if len(ctx) else 0.0  # a decode attends over its context and its token
    per_gpu = dict(sequences=max(1, math.ceil((n_pre + n_dec) / r)), context=max(1, math.ceil(max(prompt, decode_ctx))),
                   tokens=max(1, math.ceil((tin + n_dec) / r)))
    return replace(o, **per_gpu), {"label": w.label(), "steps": o.steps, "input_tokens_per_step": tin,
                                   "output_tokens_per_step": tout, "sequences_per_step": n_pre + n_dec, **per_gpu}


def _report(cfg: ModelConfig, hw: Hardware, o: PlanOptions, pl: _Plan, the_run: dict | None = None) -> int:
    layers, rpn, hbm = o.layers or cfg.num_hidden_layers, pl.ranks_per_node, pl.hbm_bytes
    params = parameter_counts(cfg, layers)
    print(f"{o.config}: {layers} of {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts (top-"
          f"{cfg.num_experts_per_tok}); {o.ranks} GPUs: EP {pl.ep} x DP {o.dp}, expert TP {o.expert_tp}, "
          f"{rpn} per node")
    print(f"\nparameters (billions)  {'total':>10} {'activated/token':>16}")
    for kind, v in params.items():
        print(f"  {kind:<21}{v['total'] / 1e9:>10.3f} {v['activated'] / 1e9:>16.3f}")
    if the_run:
        print(f"\nthe run: {the_run['label']}, {o.micro_batches} micro-batch(es) on {o.ranks} ranks: "
              f"{the_run['input_tokens_per_step']:,.1f} input and {the_run['output_tokens_per_step']:,.1f} output "
              f"tokens a step (mean of its {the_run['steps']} measured steps); its busiest GPU "
              f"{the_run['sequences']} sequences, {the_run['tokens']} tokens a layer")
    print(f"\nmemory per GPU (GiB), {o.sequences} sequences of {o.context} positions, {o.tokens} tokens a layer")
    for item, v in pl.memory.items():
        print(f"  {item:<21}{v / 2**30:>10.2f}")
    print(f"  {'fits in':<21}{hbm / 2**30:>10.2f}: {'yes' if pl.fits else 'NO'}; "
          f"at most {pl.most_sequences} sequences of {o.context} per GPU")
    print(f"\npredicted on {hw.name} (a projection: {hw.source}); {pl.dispatch} dispatch of {o.payload} rows, "
          f"{o.attention} attention, "
          f"{o.micro_batches} micro-batch(es), expert imbalance {pl.imbalance:.2f}")
    for mode, r in pl.predicted.items():
        print(f"  {mode}: {r['tokens_per_gpu']} tokens a GPU a step, step {r['step_ms']:.2f} ms, "
              f"{r['tokens_per_s_per_gpu']:,.0f} tokens/s a GPU, {r['tokens_per_s_per_gpu'] * rpn:,.0f} a node; "
              f"bottleneck: {r['bottleneck']}")
        for kind, L in r["layers"].items():
            parts = ", ".join(f"{n} {ph['ms']:.3f} ({ph['bound']})" for n, ph in L["phases"].items())
            ex = "".join(f", {n} {c['ms']:.3f} ({c['inter_node_bytes'] / 2**20:.1f} MiB across nodes)"
                         for n, c in L["exchange"].items())
            print(f"    {kind} layer x{L['count']}: {L['ms']:.3f} ms = {parts}{ex}, exposed {L['exposed_comm_ms']:.3f}")
    if pl.candidates:
        print(f"\nplacement by the loads of {o.loads_from} (--eplb {o.eplb}): each policy's rank load (the hottest "
              f"slot's rows over the mean, mean over MoE layers), bytes a GPU moves in one MoE layer (both "
              f"directions; cross-node: the busiest node's) and the predicted "
              f"{'decode' if o.mode == 'decode' else 'prefill'} step")
        print(format_candidates(pl.candidates, pl.chosen))
    if pl.placement.colocated:
        print("\nnote: more experts than slots: ranks hold several experts per layer "
              "(breaks the one-expert-per-GPU principle)")
    if o.placement:
        ids = pl.placement.layer_ids
        print("\n" + format_placement(pl.placement, ids[0] if ids else None))
    if o.json:
        pred = pl.predicted
        write_json(o.json, {"params_total": params["all"]["total"], "params_activated": params["all"]["activated"],
                            "params": params, "memory_per_gpu_bytes": pl.memory, "fits": pl.fits,
                            "max_sequences_per_gpu": pl.most_sequences, "hbm_bytes": hbm, "hardware": hw.name,
                            "imbalance": pl.imbalance,
                            "placement_candidates": [
                                {"policy": c.policy, "rank_load": c.rank_load, "inter_node_bytes": c.inter_node_bytes,
                                 "intra_node_bytes": c.intra_node_bytes, "predicted_step_ms": c.step_ms,
                                 "chosen": c is pl.chosen} for c in pl.candidates or []],
                            "predicted_step_ms": {m: r["step_ms"] for m, r in pred.items()},
                            "predicted_input_tokens_per_s": pred["prefill"]["tokens_per_s_per_gpu"] * o.ranks,
                            "predicted_output_tokens_per_s": pred["decode"]["tokens_per_s_per_gpu"] * o.ranks,
                            "predicted": pred, "run": the_run})
    return 0


def _sweep(cfg: ModelConfig, hw: Hardware, o: PlanOptions, loads_ME, group_limited: bool = True) -> int:
    """Predicted throughput per GPU over EP sizes (rows) and decode batches; scaling efficiency is a
    GPU's throughput over the smallest EP's at the same batch."""
    rows = [_plan(cfg, hw, o, ep, s, loads_ME, group_limited) for ep in sorted(o.sweep_ep) for s in o.sweep_sequences]
    base = {pl.sequences: pl for pl in rows if pl.ep == min(o.sweep_ep)}
    table = []
    print(f"{o.config} on {hw.name} (a projection), prefill {o.tokens} tokens a GPU a step, decode at "
          f"{o.context} positions\n{'EP':>5} {'seqs':>5} {'fits':>4} {'prefill tok/s/GPU':>18} "
          f"{'decode ms':>10} {'output tok/s/GPU':>17} {'efficiency':>10}  decode bottleneck")
    for pl in rows:
        pre, dec = pl.predicted["prefill"], pl.predicted["decode"]
        eff = dec["tokens_per_s_per_gpu"] / base[pl.sequences].predicted["decode"]["tokens_per_s_per_gpu"]
        table.append({"ep": pl.ep, "sequences": pl.sequences, "fits": pl.fits,
                      "prefill_tokens_per_s_per_gpu": pre["tokens_per_s_per_gpu"], "decode_step_ms": dec["step_ms"],
                      "decode_tokens_per_s_per_gpu": dec["tokens_per_s_per_gpu"], "scaling_efficiency": eff,
                      "decode_bottleneck": dec["bottleneck"]})
        print(f"{pl.ep:>5} {pl.sequences:>5} {'yes' if pl.fits else 'NO':>4} {pre['tokens_per_s_per_gpu']:>18,.0f} "
              f"{dec['step_ms']:>10.2f} {dec['tokens_per_s_per_gpu']:>17,.0f} {eff:>10.2f}  {dec['bottleneck']}")
    if o.json:
        write_json(o.json, {"hardware": hw.name, "config": o.config, "sweep": table})
    if o.sweep_plot:
        _sweep_figure(table, f"{o.config} on {hw.name} (projection)").savefig(o.sweep_plot)
    return 0


def _sweep_figure(table: list[dict], title: str):
    from matplotlib.figure import Figure  # imported late: plan without a plot needs no matplotlib
    fig = Figure(figsize=(10, 4), dpi=110, layout="constrained")
    tput, eff = fig.subplots(1, 2)
    for s in sorted({r["sequences"] for r in table}):
        rs = [r for r in table if r["sequences"] == s]
        ep = [r["ep"] for r in rs]
        tput.plot(ep, [r["decode_tokens_per_s_per_gpu"] for r in rs], marker="o", label=f"{s} sequences a GPU")
        eff.plot(ep, [r["scaling_efficiency"] for r in rs], marker="o")
        tput.scatter([r["ep"] for r in rs if not r["fits"]],
                     [r["decode_tokens_per_s_per_gpu"] for r in rs if not r["fits"]], marker="x", color="k", zorder=3)
    eps = sorted({r["ep"] for r in table})
    for ax, label in ((tput, "decode output tokens/s per GPU"), (eff, "scaling efficiency (vs smallest EP)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(eps, [str(e) for e in eps])
        ax.set_xlabel("EP size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    tput.legend(title="x: does not fit")
    fig.suptitle(title)
    return fig


def format_placement(p: ExpertPlacement, layer: int | None = None, hostnames=None) -> str:
    """A table of the placement's map of ``layer`` (a model layer id; None: the shared or only
    map): per slot its node, ranks and experts (replicas marked), then a summary."""
    slots = [p.local_experts(s * p.expert_tp, layer) for s in range(p.n_slots)]
    n_rep_E = [len(p.owners(e, layer)) for e in range(p.n_experts)]
    where = "all MoE layers" if p.layer_ids is None else f"layer {layer if layer is not None else p.layer_ids[0]}"
    lines = [f"expert placement ({where}): {p.n_experts} experts, {p.ep_size} EP ranks, expert_tp {p.expert_tp}, "
             f"{p.n_slots} slots, {len(set(p.node_of_rank))} nodes",
             f"{'node':>4} {'host':<12} {'slot':>4} {'ranks':<9} experts"]
    for s, experts in enumerate(slots):
        ranks = p.slot_ranks(s)
        host = hostnames[ranks[0]] if hostnames is not None else "-"
        rk = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        ex = ", ".join(f"{e}" + (f" (1 of {n_rep_E[e]} replicas)" if n_rep_E[e] > 1 else "") for e in experts)
        lines.append(f"{p.node_of_rank[ranks[0]]:>4} {host[:12]:<12} {s:>4} {rk:<9} {ex}")
    if p.colocated:
        per = [len(x) for x in slots]
        lines.append(f"colocated: {min(per)}-{max(per)} experts per slot (E > slots breaks one expert per GPU)")
    elif p.replicated:
        lines.append(f"replicated: {p.n_slots - p.n_experts} spare slots hold replicas (max {max(n_rep_E)} per expert)")
    else:
        lines.append("one expert per slot")
    return "\n".join(lines)
