"""A GPU and its links as data (``data/hardware/*.json``): peak FLOP/s per dtype and the fraction a
kernel reaches, HBM size and bandwidth and its fraction, and the intra-node and inter-node links as
alpha (latency) and beta (bytes/s, with the fraction an all-to-all reaches)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from hpc_moe.errors import InputError

HARDWARE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "data", "hardware")


class HardwareError(InputError):
    """A hardware name or file that plan cannot use."""


@dataclass(frozen=True)
class Link:
    bytes_per_s: float
    latency_s: float
    efficiency: float

    def seconds(self, nbytes: float, messages: float) -> float:
        """alpha-beta: the messages' latencies plus the bytes at the bandwidth reached."""
        return messages * self.latency_s + nbytes / (self.bytes_per_s * self.efficiency)


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

    def compute_s(self, flops: float, dtype: str = "bf16") -> float:
        return flops / (self.flops_per_s[dtype] * self.flops_efficiency)

    def memory_s(self, nbytes: float) -> float:
        return nbytes / (self.hbm_bytes_per_s * self.hbm_efficiency)


def hardware_names() -> list[str]:
    return sorted(n[:-5] for n in os.listdir(HARDWARE_DIR) if n.endswith(".json"))


def load_hardware(name_or_path: str) -> Hardware:
    """A name from data/hardware (``seeds-h100``, ``h100-sxm``, ``h200``) or a JSON file of the same form."""
    path = name_or_path if os.path.isfile(name_or_path) else os.path.join(HARDWARE_DIR, name_or_path + ".json")
    if not os.path.isfile(path):
        raise HardwareError(f"--hardware: no file or name {name_or_path!r} (names: {', '.join(hardware_names())})")
    try:
        with open(path) as f:
            d = json.load(f)
        links = {k: Link(float(d[k]["bytes_per_s"]), float(d[k]["latency_s"]), float(d[k]["efficiency"]))
                 for k in ("intra_node", "inter_node")}
        hw = Hardware(name=str(d.get("name", os.path.basename(path))), source=str(d.get("source", "")),
                      flops_per_s={k: float(v) for k, v in d["flops_per_s"].items()},
                      flops_efficiency=float(d["flops_efficiency"]), hbm_bytes=float(d["hbm_bytes"]),
                      hbm_bytes_per_s=float(d["hbm_bytes_per_s"]), hbm_efficiency=float(d["hbm_efficiency"]),
                      gpus_per_node=int(d["gpus_per_node"]), **links)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise HardwareError(f"--hardware {path}: not a hardware file ({type(e).__name__}: {e})") from None
    rates = [hw.flops_efficiency, hw.hbm_efficiency, hw.intra_node.efficiency, hw.inter_node.efficiency]
    positive = [hw.hbm_bytes, hw.hbm_bytes_per_s, hw.gpus_per_node, hw.intra_node.bytes_per_s,
                hw.inter_node.bytes_per_s, *hw.flops_per_s.values()]
    if "bf16" not in hw.flops_per_s or not all(0 < r <= 1 for r in rates) or not all(v > 0 for v in positive) \
            or min(hw.intra_node.latency_s, hw.inter_node.latency_s) < 0:
        raise HardwareError(f"--hardware {path}: needs flops_per_s.bf16, positive sizes and rates, "
                            "efficiencies in (0, 1] and latencies >= 0")
    return hw
