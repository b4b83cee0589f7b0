"""``hpc-moe plan --calibrate TRACE.h5 ... [--validate TRACE.h5 ...] --save FILE``: fit a hardware
file to measured traces (hpc_moe.perf.calibrate), then show, trace by trace, the step and every
phase predicted against measured: for the traces of the fit and for held-out ones
(``--validate``), which are predicted from their shape alone as ``plan`` would predict them."""
from __future__ import annotations

import datetime
import logging
import os

import numpy as np

from hpc_moe.apps.common import hardware_of
from hpc_moe.errors import UsageError
from hpc_moe.outputs import write_json
from hpc_moe.perf.calibrate import calibrate, compare
from hpc_moe.perf.shape import shapes_of
from hpc_moe.trace.reader import read_trace

log = logging.getLogger("hpc_moe")


def run_calibrate(o) -> int:
    """o: hpc_moe.apps.plan.PlanOptions with calibrate and/or validate set."""
    if o.save and not o.calibrate:
        raise UsageError("--save needs --calibrate")
    fit = [sh for p in o.calibrate for sh in shapes_of(read_trace(p))]
    held = [sh for p in o.validate for sh in shapes_of(read_trace(p))]
    loads = shapes_of(read_trace(o.loads_from))[0].loads_ME if o.loads_from else None
    if loads is not None and any(loads.shape[1] != sh.cfg.n_routed_experts for sh in held):
        raise UsageError(f"--loads-from {o.loads_from}: its experts differ from the --validate traces'")
    hw = hardware_of(o.hardware, o.links_from)
    other = sorted({f"{sh.name} ({sh.dtype})" for sh in fit + held if sh.dtype != hw.compute_dtype})
    if other:
        log.warning("%s computed in another dtype than --hardware %s (%s): its peaks are of another machine "
                    "(a CPU trace wants --hardware cpu-2core or a file calibrated on such traces)",
                    ", ".join(other), hw.name, hw.compute_dtype)
    if fit and len(fit) < 4:
        log.warning("%d shape(s) to fit a phase rate per phase and mode, the links and the sharing of devices: "
                    "the fit's own errors say little; judge it by --validate on other traces", len(fit))
    if fit:
        name = os.path.splitext(os.path.basename(o.save))[0] if o.save else f"{hw.name}-calibrated"
        peaks = hw.calibration.get("peaks", f"{hw.name}: {hw.source}")
        source = (f"peaks of {peaks}; fractions reached, fixed costs, concurrency and links fitted by hpc-moe "
                  f"plan --calibrate on {len(o.calibrate)} traces, {datetime.date.today().isoformat()}")
        hw, record = calibrate(fit, hw, name, source)
        hw.calibration["peaks"] = peaks  # what a later calibration on this file keeps
        print(f"fitted {hw.name} on {len(fit)} shapes from {len(o.calibrate)} traces (peaks of the base kept)")
        for phase, r in hw.phases.items():
            rec = record["phases"][phase]
            print(f"  {phase:<24} {r.flops_efficiency:7.3f} of peak FLOP/s  {r.hbm_efficiency:7.3f} of peak bytes/s  "
                  f"{r.overhead_s * 1e6:9.1f} us a call   ({rec['samples']} samples, median error "
                  f"{rec['median_relative_error']:.1%})")
        for kind, link in (("intra-node", hw.intra_node), ("inter-node", hw.inter_node)):
            print(f"  {kind} link: {link.latency_s * 1e6:.1f} us a message, {link.efficiency:.3f} of "
                  f"{link.bytes_per_s / 1e9:.1f} GB/s")
        line = (f"{hw.concurrency['intercept']:.2f} + {hw.concurrency['slope']:.2f} x busy" if hw.concurrency
                else "1 (not measured)")
        print(f"  fixed cost a step: {hw.step_overhead_s * 1e3:.3f} ms; ranks sharing a device: concurrency {line}, "
              f"efficiency {hw.oversubscribed_efficiency:.2f}")
        if o.save:
            write_json(o.save, hw.to_dict())
            print(f"wrote {o.save}")
    rows = [dict(compare(sh, hw), set="fit") for sh in fit] + \
           [dict(compare(sh, hw, loads), set="held out") for sh in held]
    _table(rows, hw.name, o.loads_from)
    if o.json:
        write_json(o.json, {"hardware": hw.to_dict(), "traces": rows, **_errors(rows)})
    return 0


def _errors(rows: list[dict]) -> dict:
    out = {}
    for which in ("fit", "held out"):
        e = np.abs([r["error"] for r in rows if r["set"] == which])
        if len(e):
            out[which.replace(" ", "_")] = {"median_abs_error": float(np.median(e)), "max_abs_error": float(e.max()),
                                           "traces": len(e)}
    return out


def _table(rows: list[dict], hw_name: str, loads_from: str | None) -> None:
    print(f"\nstep predicted on {hw_name} against measured (medians over each trace's steps); phases: ms a step "
          f"summed over layers, the slowest rank of each, measured/predicted; expert imbalance "
          f"{'from ' + loads_from if loads_from else 'from each trace' + chr(39) + 's expert loads'}")
    print(f"{'set':<9} {'mode':<8} {'ranks':>5} {'tok/rank':>8} {'context':>7} {'measured':>9} {'predicted':>9} "
          f"{'error':>7}  trace")
    for r in rows:
        print(f"{r['set']:<9} {r['mode']:<8} {r['ranks']:>5} {r['tokens_per_rank']:>8.0f} {r['context']:>7.0f} "
              f"{r['measured_step_ms']:>9.2f} {r['predicted_step_ms']:>9.2f} {r['error']:>+7.1%}  {r['trace']}")
        print("          " + ", ".join(f"{k} {v['measured_ms']:.2f}/{v['predicted_ms']:.2f}"
                                      for k, v in r["phases"].items()))
    for which, e in _errors(rows).items():
        print(f"{which.replace('_', ' ')}: {e['traces']} shapes, median |error| {e['median_abs_error']:.1%}, "
              f"max {e['max_abs_error']:.1%}")
