"""The throughput tables of docs/projections.md: hpc-moe plan over EP sizes and deployment
variants on an H100 cluster, printed as Markdown. Every figure is `hpc-moe plan --json`'s.

    .venv/bin/python scripts/projections.py [--hardware h100-sxm] > tables.md
"""
import argparse
import json
import os
import tempfile

from hpc_moe.cli import main as hpc_moe

VARIANTS = {  # name: plan flags
    "as written": [],
    "fused attention": ["--attention", "fused"],
    "+ FP8 dispatch": ["--attention", "fused", "--payload", "fp8"],
    "+ 2 micro-batches": ["--attention", "fused", "--payload", "fp8", "--micro-batches", "2"],
}


def plan(config: str, ep: int, hardware: str, flags: list) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "plan.json")
        with open(os.devnull, "w") as null, _stdout(null):
            assert hpc_moe(["plan", "--config", config, "--ranks", str(ep), "--sequences", "128",
                            "--hardware", hardware, "--json", out, *flags]) == 0
        with open(out) as f:
            return json.load(f)


class _stdout:
    def __init__(self, f):
        self.f = f

    def __enter__(self):
        import sys
        self.old, sys.stdout = sys.stdout, self.f

    def __exit__(self, *exc):
        import sys
        sys.stdout = self.old


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hardware", default="h100-sxm")
    a = p.parse_args()
    print("| config | EP | fits | prefill ms | input tok/s a node | prefill bottleneck | decode ms "
          "| output tok/s a node | decode bottleneck |\n|---|---|---|---|---|---|---|---|---|")
    for config in ("paper", "deepseek-v3"):
        for ep in (16, 32, 64, 128, 256):
            r = plan(config, ep, a.hardware, [])
            pre, dec = r["predicted"]["prefill"], r["predicted"]["decode"]
            print(f"| {config} | {ep} | {'yes' if r['fits'] else 'no'} | {pre['step_ms']:.0f} | "
                  f"{pre['tokens_per_s_per_gpu'] * 8:,.0f} | {pre['bottleneck']} | {dec['step_ms']:.1f} | "
                  f"{dec['tokens_per_s_per_gpu'] * 8:,.0f} | {dec['bottleneck']} |")
    print("\n| config | EP | variant | NICs a node | input tok/s a node | output tok/s a node | decode bottleneck |"
          "\n|---|---|---|---|---|---|---|")
    for config, ep in (("deepseek-v3", 64), ("paper", 64), ("paper", 256)):
        for name, flags in VARIANTS.items():
            for nics in (2, 4, 8):
                r = plan(config, ep, a.hardware, [*flags, "--nics-per-node", str(nics)])
                pre, dec = r["predicted"]["prefill"], r["predicted"]["decode"]
                print(f"| {config} | {ep} | {name} | {nics} | {pre['tokens_per_s_per_gpu'] * 8:,.0f} | "
                      f"{dec['tokens_per_s_per_gpu'] * 8:,.0f} | {dec['bottleneck']} |")


if __name__ == "__main__":
    main()
