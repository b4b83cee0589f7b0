"""A hardware file fitted to measured traces, and predicted against measured per trace.

The traces are read as shapes (hpc_moe.perf.shape.Shape: predict_step's inputs and the medians
measured over one kind of step). The fit, per phase of a layer and mode, finds the fractions
of the peak FLOP/s and HBM bandwidth and the fixed cost per call that best explain the slowest
rank's time in that phase of every layer (relative least squares on a log grid, then a finer one:
durations span decades); then the links' latency and efficiency from the exchange time left
exposed (the layer's time beyond its compute, Shape.exposed_s); then a fixed cost per step from
the wall time the layers leave unexplained (embedding, head, sampling, barriers). Ranks that
outnumber the devices (8 ranks on 2 cores) share them: how often they compute at the same time is
measured from the timelines, and what sharing costs beyond that is the efficiency that predicts
the fit's steps best. The peaks stay those of the base hardware file: the fit says what fraction
of them this software reaches.

Legend: L layers, M MoE layers, R ranks, E experts.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from hpc_moe.perf.hardware import DTYPE_BYTES, Hardware, Link, PhaseRate
from hpc_moe.perf.predict import exchanges, layer_work, messages, predict_step
from hpc_moe.perf.shape import CalibrationError, Shape

# trace phase -> predicted phase (hpc_moe.perf.predict.layer_work)
PHASE_OF = {"attention": "attention", "dense_mlp": "dense_mlp", "gate": "gate", "shared": "shared_experts",
            "expert": "routed_experts", "dispatch": "dispatch", "combine": "combine"}
_EFF = np.logspace(-4, 0, 49)
SYNC_S = (0.0, *np.logspace(-5, -2, 31))  # the wait an exchange adds per rank a device beyond one
OVERSUBSCRIBED_EFFICIENCIES = tuple(np.round(np.arange(0.4, 1.001, 0.05), 2))


def imbalance_of(sh: Shape, loads_ME: np.ndarray | None = None) -> float:
    """predict_step's ``imbalance`` for the shape: per MoE layer, the hottest rank's expert rows,
    the experts loaded as ``loads_ME`` ([M, E]; their mean for every layer when M differs from
    the shape's; default: as measured in the shape), over the rows the hottest rank's tokens bring
    to a slot under uniform routing; the mean over layers (each layer waits for its own hottest rank)."""
    cfg, ep = sh.cfg, sh.layout.ep
    loads = sh.loads_ME if loads_ME is None else np.asarray(loads_ME, float)
    if len(loads) != len(sh.loads_ME):
        loads = loads.mean(axis=0, keepdims=True)
    per_slot = -(-cfg.n_routed_experts // ep)
    total = sh.tokens_R.sum() * cfg.num_experts_per_tok
    uniform = sh.tokens_R.max() * cfg.num_experts_per_tok * ep / cfg.n_routed_experts * per_slot
    if not uniform:
        return 1.0
    slot_E = np.arange(cfg.n_routed_experts) // per_slot
    return float(np.mean([np.bincount(slot_E, row / max(row.sum(), 1) * total, ep).max() / uniform for row in loads]))


def predicted(sh: Shape, hw: Hardware, loads_ME: np.ndarray | None = None) -> dict:
    """predict_step for the shape on hw, as ``hpc-moe plan`` would run it."""
    i = int(np.argmax(sh.tokens_R))
    return predict_step(sh.cfg, sh.layout, hw, mode=sh.mode, tokens=float(sh.tokens_R[i]),
                        sequences=float(sh.sequences_R[i]), context=sh.context, expert_fp8=False,
                        dispatch=sh.dispatch, micro_batches=sh.micro_batches, imbalance=imbalance_of(sh, loads_ME),
                        layers=sh.layers, payload=sh.payload, ranks_per_host=sh.ranks_per_host)


# ------------------------------------------------------------------------------------------ the fit
def _share(sh: Shape, hw: Hardware) -> float:
    """The device share the shape's ranks had: from its measured concurrency, else its busy fraction."""
    return hw.device_share(sh.ranks_per_host, hw.concurrency_at(sh.busy) if sh.concurrency is None else sh.concurrency)


def _samples(shapes: list[Shape], hw: Hardware) -> dict[str, list]:
    """Per predicted phase and mode ("attention:decode"): rows of (flops, bytes, calls, share,
    measured s), one per shape and
    layer: the most work any rank had in that phase and the longest any rank took, since the step
    waits for the slowest rank at every exchange (ranks that share cores are slowed unevenly, and
    the fit must see the straggler, not the typical rank)."""
    rows: dict[str, list] = {}
    for sh in shapes:
        share = _share(sh, hw)
        moe = {layer: i for i, layer in enumerate(l for l in range(sh.layers) if sh.cfg.is_moe_layer(l))}
        for layer in range(sh.layers):
            m = moe.get(layer)
            works = [layer_work(sh.cfg, layer, mode=sh.mode, tokens=sh.tokens_R[r], sequences=sh.sequences_R[r],
                                context=sh.context, pairs=sh.pairs_MR[m, r] if m is not None else 0.0,
                                rows_sent=sh.rows_R[r], act_bytes=DTYPE_BYTES[sh.dtype],
                                expert_bytes=DTYPE_BYTES[sh.dtype],
                                experts_here=sh.experts_MR[m, r] if m is not None else 0.0, payload=sh.payload)
                     for r in range(sh.layout.ep)]
            for tp, name in PHASE_OF.items():
                t = sh.phase_LRP[layer, :, sh.phases.index(tp)].max()
                if name in works[0] and t > 0:
                    f, b = np.max([w[name] for w in works], axis=0)
                    rows.setdefault(f"{name}:{sh.mode}", []).append((f, b, sh.micro_batches, share, t))
    return rows


def _around(best: float, grid: np.ndarray, points: int = 15) -> np.ndarray:
    """A finer grid spanning the coarse grid's step either side of ``best`` (fractions stay <= 1)."""
    step = grid[2] / grid[1]
    return np.unique(np.clip(best * step ** np.linspace(-1, 1, points), 0, 1.0))


def _phase_search(f, b, calls, share, t, peak, bw, ef, em, overheads) -> tuple:
    """(loss, flops fraction, HBM fraction, fixed cost) of the grid's best point."""
    cf = f[:, None] / (peak * share[:, None] * ef)  # [N, A]
    cm = b[:, None] / (bw * share[:, None] * em)  # [N, B]
    roof = np.maximum(cf[:, :, None], cm[:, None, :])  # [N, A, B]
    prefer = 1e-6 * (-np.log(ef)[:, None] - np.log(em)[None, :])  # ties: the higher fractions
    best = (np.inf, 1.0, 1.0, 0.0)
    for o in overheads:
        loss = (np.log((roof + o * calls[:, None, None]) / t[:, None, None]) ** 2).mean(0) + prefer
        i, j = np.unravel_index(np.argmin(loss), loss.shape)
        if loss[i, j] < best[0]:
            best = (loss[i, j], ef[i], em[j], o)
    return best


def fit_phase(rows: list, peak: float, bw: float, base: PhaseRate) -> tuple[PhaseRate, float]:
    """The (flops fraction, HBM fraction, fixed cost per call) with the least squared log error,
    on a log grid and then a finer one around its best; among near-equal fits the higher fractions
    (what the data do not rule out). Returns the rate and the median relative error of its samples."""
    f, b, calls, share, t = (np.array(c, float) for c in zip(*rows))
    overheads = np.concatenate([[0.0], np.logspace(-7, math.log10(t.max()), 48)])
    _, ef, em, o = _phase_search(f, b, calls, share, t, peak, bw, _EFF, _EFF, overheads)
    finer = o * np.linspace(0.6, 1.4, 17) if o else np.concatenate([[0.0], np.logspace(-8, -7, 5)])
    _, ef, em, o = _phase_search(f, b, calls, share, t, peak, bw, _around(ef, _EFF), _around(em, _EFF), finer)
    rate = PhaseRate(float(ef) if f.any() else base.flops_efficiency, float(em), float(o))
    pred = o * calls + np.maximum(f / (peak * share * ef), b / (bw * share * em))
    return rate, float(np.median(np.abs(pred / t - 1)))


def _exposed(shapes: list[Shape], hw: Hardware) -> list[tuple]:
    """Per shape and MoE layer: (intra bytes, inter bytes, intra msgs, inter msgs, share, compute
    that hides it (s), measured exposed s, measured layer s, ranks a device beyond one) for the
    link fit."""
    rows = []
    for sh in shapes:
        pred = predicted(sh, hw)["layers"]["moe"]
        hidden = pred["phases"]["shared_experts"]["ms"] / 1e3 + \
            pred["phases"]["attention"]["ms"] / 1e3 * (sh.micro_batches - 1) / sh.micro_batches
        share = _share(sh, hw)
        for layer in (layer for layer in range(sh.layers) if sh.cfg.is_moe_layer(layer)):
            exposed = sh.exposed_s(layer)
            rows.append((*sh.remote_R2.mean(axis=0), *messages(sh.layout, sh.dispatch), share, hidden, exposed,
                         sh.phase_LRP[layer].sum(axis=1).max(),
                         exchanges(sh.layout, sh.dispatch) * hw.oversubscription(sh.ranks_per_host)))
    return rows


def _link_search(nbytes, msgs, share, hidden, exposed, layer, fixed, bytes_per_s, concurrent, lat, eff) -> tuple:
    s = (msgs[:, None, None] * lat[None, :, None] + nbytes[:, None, None] / (bytes_per_s * eff[None, None, :])) \
        / share[:, None, None]
    s = np.where(nbytes[:, None, None] > 0, s, 0.0)
    both = np.maximum(s, fixed[:, None, None]) if concurrent else s + fixed[:, None, None]
    pred = np.maximum(0.0, both - hidden[:, None, None])
    loss = (((pred - exposed[:, None, None]) / layer[:, None, None]) ** 2).mean(0) \
        + 1e-9 * (np.arange(len(lat))[:, None] - np.log(eff)[None, :])  # ties: lower latency, higher fraction
    i, j = np.unravel_index(np.argmin(loss), loss.shape)
    return lat[i], eff[j]


def fit_link(rows: list, base: Link, use: int, other: Link | None, concurrent: bool = True,
             sync_s: float = 0.0) -> Link:
    """Latency and efficiency of one link (use 0: intra-node, 1: inter-node) that best explain the
    exposed exchange time, the other link held at ``other`` (error relative to the layer's time;
    concurrent: the layer takes the longer of the two links, else their sum; sync_s: the wait an
    all-to-all adds per rank a device beyond one); a log grid, then a finer one around its best."""
    intra_b, inter_b, intra_m, inter_m, share, hidden, exposed, layer, over = (np.array(c, float) for c in zip(*rows))
    exposed = exposed - over * sync_s
    (nbytes, msgs), (ob, om) = ((intra_b, intra_m), (inter_b, inter_m))[::1 if use == 0 else -1]
    fixed = np.zeros_like(nbytes) if other is None else np.where(ob > 0, other.seconds(ob, om, share), 0.0)
    args = (nbytes, msgs, share, hidden, exposed, layer, fixed, base.bytes_per_s, concurrent)
    coarse = np.concatenate([[0.0], np.logspace(-7, -2, 41)])
    lat, eff = _link_search(*args, coarse, _EFF)
    finer = lat * np.linspace(0.7, 1.3, 13) if lat else np.concatenate([[0.0], np.logspace(-9, -7, 5)])
    lat, eff = _link_search(*args, finer, _around(eff, _EFF))
    return Link(base.bytes_per_s, float(lat), float(eff))


def _links_loss(rows: list, hw: Hardware) -> float:
    """The link fit's loss: squared error of the exposed time predicted per layer, relative to it."""
    intra_b, inter_b, intra_m, inter_m, share, hidden, exposed, layer, over = (np.array(c, float) for c in zip(*rows))
    a = np.where(intra_b > 0, hw.intra_node.seconds(intra_b, intra_m, share), 0.0)
    b = np.where(inter_b > 0, hw.inter_node.seconds(inter_b, inter_m, share), 0.0)
    both = np.maximum(a, b) if hw.links_concurrent else a + b
    pred = np.maximum(0.0, both - hidden) + over * hw.oversubscribed_sync_s
    return float((((pred - exposed) / layer) ** 2).mean())


def _fit(shapes: list[Shape], hw: Hardware) -> tuple[Hardware, dict]:
    """Per-phase rates, then links, then the fixed step cost, on hw's peaks and device sharing."""
    record: dict = {"phases": {}}
    phases = {}
    for phase, rows in _samples(shapes, hw).items():
        phases[phase], err = fit_phase(rows, hw.flops_per_s[hw.compute_dtype], hw.hbm_bytes_per_s, hw.rate(phase))
        record["phases"][phase] = {"samples": len(rows), "median_relative_error": err}
    hw = dataclasses.replace(hw, phases=phases)
    links = _exposed(shapes, hw)
    single = [r for r in links if r[1] == 0]
    multi = [r for r in links if r[1] > 0]
    fits = []
    for sync in SYNC_S if any(r[-1] > 0 for r in links) else (0.0,):
        intra = fit_link(single or links, hw.intra_node, 0, None, sync_s=sync)
        inter = fit_link(multi, hw.inter_node, 1, intra, hw.links_concurrent, sync) if multi else intra
        fit = dataclasses.replace(hw, intra_node=intra, inter_node=inter, oversubscribed_sync_s=float(sync))
        fits.append((_links_loss(links, fit), sync, fit))
    hw = min(fits, key=lambda f: f[:2])[2]
    record["links"] = {"intra_node_samples": len(single or links), "inter_node_samples": len(multi),
                       "inter_node": "fitted" if multi else "no trace crossed nodes: the intra-node fit"}
    residual = [(sh.step_s - sum(sh.phase_LRP[layer].sum(axis=1).max() for layer in range(sh.layers))
                 - predicted(sh, hw)["head"]["ms"] / 1e3) * _share(sh, hw)
                for sh in shapes]
    return dataclasses.replace(hw, step_overhead_s=max(0.0, float(np.median(residual)))), record


def _concurrency_line(shapes: list[Shape], base: Hardware) -> dict:
    """Least squares concurrency = intercept + slope x busy over the shapes whose ranks outnumbered
    the devices (ranks stagger when they wait more: the busier the step, the more they overlap);
    the base's line when fewer than two such shapes have timelines."""
    pts = np.array([(sh.busy, sh.concurrency) for sh in shapes
                    if sh.concurrency is not None and sh.ranks_per_host > base.gpus_per_node]).reshape(-1, 2)
    if len(pts) < 2 or np.ptp(pts[:, 0]) < 0.05:
        return dict(base.concurrency)
    slope, intercept = np.polyfit(pts[:, 0], pts[:, 1], 1)
    return {"intercept": float(intercept), "slope": float(slope)}


def calibrate(shapes: list[Shape], base: Hardware, name: str, source: str) -> tuple[Hardware, dict]:
    """The base hardware with its compute dtype, per-phase rates, links and fixed step cost
    fitted to the shapes, and how the concurrency of ranks that outnumber its devices (measured in
    their timelines) follows their busy fraction; and the fit's record (per phase: samples and median
    relative error). What oversubscription costs beyond the share of the cores (switches, caches)
    no per-phase sample shows: its efficiency is the one whose fit predicts the steps best."""
    dtypes = {sh.dtype for sh in shapes}
    if len(dtypes) != 1:
        raise CalibrationError(f"--calibrate: the traces computed in different dtypes ({', '.join(sorted(dtypes))})")
    dtype = dtypes.pop()
    if dtype not in base.flops_per_s:
        raise CalibrationError(f"--calibrate: the traces computed in {dtype} but the base hardware "
                               f"{base.name} has no flops_per_s.{dtype}")
    hw = dataclasses.replace(base, name=name, source=source, compute_dtype=dtype, phases={}, step_overhead_s=0.0,
                             concurrency=_concurrency_line(shapes, base))
    over = [sh for sh in shapes if sh.ranks_per_host > hw.gpus_per_node]
    fits = {}
    for eta in OVERSUBSCRIBED_EFFICIENCIES if over else (1.0,):
        fit, record = _fit(shapes, dataclasses.replace(hw, oversubscribed_efficiency=eta))
        err = [predicted(sh, fit)["step_ms"] / (sh.step_s * 1e3) - 1 for sh in shapes]
        fits[eta] = (float(np.sqrt(np.mean(np.square(err)))), fit, record)
    eta = min(fits, key=lambda k: fits[k][0])
    _, fit, record = fits[eta]
    record["oversubscribed_efficiency_rms_step_error"] = {str(k): v[0] for k, v in fits.items()}
    record["concurrency_samples"] = [(sh.busy, sh.concurrency) for sh in shapes
                                     if sh.concurrency is not None and sh.ranks_per_host > base.gpus_per_node]
    record["traces"] = [sh.label for sh in shapes]
    return dataclasses.replace(fit, calibration=record), record


def compare(sh: Shape, hw: Hardware, loads_ME: np.ndarray | None = None) -> dict:
    """Predicted against measured for one shape: the step, and per phase its time summed over the
    layers (the slowest rank of each layer, as the step waits for it); "exposed" is the exchange
    time no compute hid."""
    p = predicted(sh, hw, loads_ME)
    measured = {name: sum(sh.phase_LRP[layer, :, sh.phases.index(tp)].max() for layer in range(sh.layers))
                for tp, name in PHASE_OF.items()}
    measured["exposed"] = sum(sh.exposed_s(layer) for layer in range(sh.layers))
    pred = {name: 0.0 for name in measured}
    for L in p["layers"].values():
        for name, ph in L["phases"].items():
            pred[name] += L["count"] * ph["ms"] / 1e3
        pred["exposed"] += L["count"] * L["exposed_comm_ms"] / 1e3
    return {"trace": sh.name, "label": sh.label, "mode": sh.mode, "ranks": sh.layout.ep,
            "tokens_per_rank": float(sh.tokens_R.max()), "context": sh.context,
            "measured_step_ms": sh.step_s * 1e3, "predicted_step_ms": p["step_ms"],
            "error": p["step_ms"] / (sh.step_s * 1e3) - 1,
            "phases": {k: {"measured_ms": measured[k] * 1e3, "predicted_ms": pred[k] * 1e3} for k in measured}}
