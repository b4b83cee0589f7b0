"""A GPU and its links as data (``data/hardware/*.json``): peak FLOP/s per dtype and the fraction a
kernel reaches, HBM size and bandwidth and its fraction, and the intra-node and inter-node links as
alpha (latency) and beta (bytes/s, with the fraction an all-to-all reaches).

Optional fields, written by ``hpc-moe plan --calibrate``: ``compute_dtype`` (what activations and
dense weights are held in, default "bf16"); ``phases`` (per phase of a layer, "name" or
"name:mode": the fractions that phase reaches and a fixed cost per call: launches, interpreter);
``step_overhead_s`` (a fixed cost per step outside the layers); for ranks that outnumber the
devices, ``concurrency`` (intercept and slope of a line in the busy fraction) and
``oversubscribed_efficiency`` (see Hardware.device_share) and ``oversubscribed_sync_s`` (what
each exchange waits per rank a device beyond one: for its peers to be scheduled); ``links_concurrent`` (false where one
engine moves both links' bytes: MPI shared memory on a CPU node, whose simulated nodes are the
same memory; default true: NVLink and the NIC); ``calibration`` (what the fit saw, kept for the
record).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import numpy as np

from hpc_moe.errors import InputError
from hpc_moe.links import Links

HARDWARE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "data", "hardware")
DTYPE_BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}


class HardwareError(InputError):
    """A hardware name or file that plan cannot use."""


@dataclass(frozen=True)
class Link:
    bytes_per_s: float
    latency_s: float
    efficiency: float

    def seconds(self, nbytes: float, messages: float, share: float = 1.0) -> float:
        """alpha-beta: the messages' latencies plus the bytes at the bandwidth reached; ranks
        that get ``share`` of a device get that share of its links, and a message waits that much
        longer for its peer to be running."""
        return (messages * self.latency_s + nbytes / (self.bytes_per_s * self.efficiency)) / share


@dataclass(frozen=True)
class PhaseRate:
    """What one phase of a layer reaches: fractions of the peak FLOP/s and HBM bandwidth, and a
    fixed cost per call."""

    flops_efficiency: float
    hbm_efficiency: float
    overhead_s: float = 0.0

    def to_dict(self) -> dict:
        return {"flops_efficiency": self.flops_efficiency, "hbm_efficiency": self.hbm_efficiency,
                "overhead_s": self.overhead_s}


@dataclass(frozen=True)
class Hardware:
    name: str
    source: str
    flops_per_s: dict
    flops_efficiency: float
    hbm_bytes: float
    hbm_bytes_per_s: float
    hbm_efficiency: float
    gpus_per_node: int
    intra_node: Link
    inter_node: Link
    compute_dtype: str = "bf16"
    phases: dict = field(default_factory=dict)
    step_overhead_s: float = 0.0
    concurrency: dict = field(default_factory=dict)
    oversubscribed_efficiency: float = 1.0
    links_concurrent: bool = True
    oversubscribed_sync_s: float = 0.0
    calibration: dict = field(default_factory=dict)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]

    def rate(self, phase: str, mode: str = "") -> PhaseRate:
        """The phase's calibrated rates in this mode ("attention:decode"; prefill and decode run
        different kernels on different shapes), else the phase's, else the file's global fractions
        with no fixed cost."""
        return self.phases.get(f"{phase}:{mode}") or self.phases.get(phase) or \
            PhaseRate(self.flops_efficiency, self.hbm_efficiency)

    def phase_s(self, phase: str, flops: float, nbytes: float, dtype: str | None = None,
                share: float = 1.0, mode: str = "") -> tuple[float, str]:
        """Roofline of one call: its fixed cost plus the larger of its FLOPs at the compute rate and
        its bytes at the HBM rate the phase reaches (``share`` of the device: ranks that share one
        divide it); returns (seconds, "compute" | "memory")."""
        r = self.rate(phase, mode)
        peak = self.flops_per_s.get(dtype or self.compute_dtype, self.flops_per_s[self.compute_dtype])
        c = flops / (peak * r.flops_efficiency * share)
        m = nbytes / (self.hbm_bytes_per_s * r.hbm_efficiency * share)
        return r.overhead_s + max(c, m), "compute" if c >= m else "memory"

    def concurrency_at(self, busy: float) -> float:
        """The fraction of a rank's compute time another rank of its node computes too, when ranks
        compute a ``busy`` fraction of the step: the file's ``concurrency`` line (intercept + slope
        x busy, fitted to timelines), within [0, 1]; 1 without one."""
        if not self.concurrency:
            return 1.0
        return min(1.0, max(0.0, self.concurrency["intercept"] + self.concurrency["slope"] * busy))

    def oversubscription(self, ranks_per_node: int) -> float:
        """Ranks a device beyond one (0 when each rank has its own)."""
        return max(0.0, ranks_per_node / self.gpus_per_node - 1)

    def device_share(self, ranks_per_node: int, concurrency: float = 1.0) -> float:
        """The fraction of a device a computing rank gets when more ranks than devices share a
        node: devices / (1 + (ranks - 1) c), at most 1, c the fraction of its compute time another
        rank computes too (ranks that wait in MPI yield the cores to those that work); times
        ``oversubscribed_efficiency`` (switching between ranks costs, and each evicts the others'
        caches). 1 when each rank has its own device."""
        if ranks_per_node <= self.gpus_per_node:
            return 1.0
        return min(1.0, self.gpus_per_node / (1 + (ranks_per_node - 1) * concurrency)) * self.oversubscribed_efficiency

    def with_links(self, links: Links, where: str) -> Hardware:
        """This hardware with the links a run measured (hpc_moe.links; ``where``: the trace, for
        the name): inside and between nodes, the median bandwidth and latency of the measured
        pairs as the links' bytes/s and latency, reached in full (efficiency 1): what the links
        carried, before what an all-to-all loses on them (the calibration fits that fraction)."""
        def link(bw, lat, fallback: Link) -> Link:
            return Link(float(np.median(bw)), float(np.median(lat)), 1.0) if len(bw) else fallback

        n = links.num_nodes
        off, diag = ~np.eye(n, dtype=bool), np.isfinite(np.diag(links.bytes_per_s_NN))
        inter = link(links.between(), links.latency_s_NN[off], self.inter_node)
        intra = link(links.inside(), np.diag(links.latency_s_NN)[diag], self.intra_node)
        return replace(self, name=f"{self.name}, links of {where}", intra_node=intra, inter_node=inter)

    def to_dict(self) -> dict:
        link = lambda k: {"bytes_per_s": k.bytes_per_s, "latency_s": k.latency_s, "efficiency": k.efficiency}  # noqa: E731
        return {"name": self.name, "source": self.source, "compute_dtype": self.compute_dtype,
                "flops_per_s": dict(self.flops_per_s), "flops_efficiency": self.flops_efficiency,
                "hbm_bytes": self.hbm_bytes, "hbm_bytes_per_s": self.hbm_bytes_per_s,
                "hbm_efficiency": self.hbm_efficiency, "gpus_per_node": self.gpus_per_node,
                "intra_node": link(self.intra_node), "inter_node": link(self.inter_node),
                "phases": {k: v.to_dict() for k, v in self.phases.items()},
                "step_overhead_s": self.step_overhead_s, "concurrency": dict(self.concurrency),
                "oversubscribed_efficiency": self.oversubscribed_efficiency,
                "links_concurrent": self.links_concurrent, "oversubscribed_sync_s": self.oversubscribed_sync_s,
                "calibration": self.calibration}


def hardware_names() -> list[str]:
    return sorted(n[:-5] for n in os.listdir(HARDWARE_DIR) if n.endswith(".json"))


def load_hardware(name_or_path: str) -> Hardware:
    """A name from data/hardware (``seeds-h100``, ``h100-sxm``, ``h200``, ``cpu-2core``) or a JSON file
    of the same form."""
    path = name_or_path if os.path.isfile(name_or_path) else os.path.join(HARDWARE_DIR, name_or_path + ".json")
    if not os.path.isfile(path):
        raise HardwareError(f"--hardware: no file or name {name_or_path!r} (names: {', '.join(hardware_names())})")
    try:
        with open(path) as f:
            d = json.load(f)
        links = {k: Link(float(d[k]["bytes_per_s"]), float(d[k]["latency_s"]), float(d[k]["efficiency"]))
                 for k in ("intra_node", "inter_node")}
        phases = {str(k): PhaseRate(float(v["flops_efficiency"]), float(v["hbm_efficiency"]), float(v["overhead_s"]))
                  for k, v in d.get("phases", {}).items()}
        hw = Hardware(name=str(d.get("name", os.path.basename(path))), source=str(d.get("source", "")),
                      flops_per_s={k: float(v) for k, v in d["flops_per_s"].items()},
                      flops_efficiency=float(d["flops_efficiency"]), hbm_bytes=float(d["hbm_bytes"]),
                      hbm_bytes_per_s=float(d["hbm_bytes_per_s"]), hbm_efficiency=float(d["hbm_efficiency"]),
                      gpus_per_node=int(d["gpus_per_node"]), compute_dtype=str(d.get("compute_dtype", "bf16")),
                      phases=phases, step_overhead_s=float(d.get("step_overhead_s", 0.0)),
                      concurrency={k: float(d["concurrency"][k]) for k in ("intercept", "slope")}
                      if d.get("concurrency") else {},
                      oversubscribed_efficiency=float(d.get("oversubscribed_efficiency", 1.0)),
                      links_concurrent=bool(d.get("links_concurrent", True)),
                      oversubscribed_sync_s=float(d.get("oversubscribed_sync_s", 0.0)),
                      calibration=dict(d.get("calibration", {})), **links)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise HardwareError(f"--hardware {path}: not a hardware file ({type(e).__name__}: {e})") from None
    rates = [hw.flops_efficiency, hw.hbm_efficiency, hw.oversubscribed_efficiency, hw.intra_node.efficiency,
             hw.inter_node.efficiency,
             *(x for p in hw.phases.values() for x in (p.flops_efficiency, p.hbm_efficiency))]
    positive = [hw.hbm_bytes, hw.hbm_bytes_per_s, hw.gpus_per_node, hw.intra_node.bytes_per_s,
                hw.inter_node.bytes_per_s, *hw.flops_per_s.values()]
    fixed = [hw.intra_node.latency_s, hw.inter_node.latency_s, hw.step_overhead_s, hw.oversubscribed_sync_s,
             *(p.overhead_s for p in hw.phases.values())]
    if hw.compute_dtype not in DTYPE_BYTES or hw.compute_dtype not in hw.flops_per_s \
            or not all(0 < r <= 1 for r in rates) or not all(v > 0 for v in positive) or min(fixed) < 0:
        raise HardwareError(f"--hardware {path}: needs flops_per_s of its compute_dtype (bf16 unless it says; one of "
                            f"{', '.join(DTYPE_BYTES)}), positive sizes and rates, efficiencies in (0, 1] "
                            "and latencies and overheads >= 0")
    return hw
