"""hpc-moe plan's arithmetic: parameters by kind and memory per GPU, against numbers derived here
from the config's fields (not from the code under test) and the published DeepSeek-V3 figures."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
from test_trace import Dims, layout, meta, write_synthetic

from hpc_moe.cli import main
from hpc_moe.config import load_config
from hpc_moe.links import Links
from hpc_moe.perf.calibrate import fit_link, fit_phase
from hpc_moe.perf.footprint import GpuLoad, Layout, memory_per_gpu, parameter_counts
from hpc_moe.perf.hardware import Link, PhaseRate, load_hardware
from hpc_moe.perf.predict import predict_step, reach
from hpc_moe.trace.reader import read_trace
from hpc_moe.trace.writer import TraceWriter


def by_hand(c) -> tuple[int, int]:
    """(total, activated per token) parameters of a DeepSeek-V3-shaped config, from its fields."""
    H, heads = c.hidden_size, c.num_attention_heads
    q = (H * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)
         if c.q_lora_rank else H * heads * (c.qk_nope_head_dim + c.qk_rope_head_dim))
    attn = (q + H * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
            + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim) + heads * c.v_head_dim * H + 2 * H)
    dense = 3 * H * c.intermediate_size
    expert = 3 * H * c.moe_intermediate_size
    moe = c.n_routed_experts * expert + c.n_shared_experts * expert + c.n_routed_experts * H + c.n_routed_experts
    moe_active = c.num_experts_per_tok * expert + c.n_shared_experts * expert + c.n_routed_experts * (H + 1)
    n_dense, n_moe = c.first_k_dense_replace, c.num_hidden_layers - c.first_k_dense_replace
    rest = c.vocab_size * H * (1 if c.tie_word_embeddings else 2) + H
    total = c.num_hidden_layers * attn + n_dense * dense + n_moe * moe + rest
    active = c.num_hidden_layers * attn + n_dense * dense + n_moe * moe_active + rest
    return total, active


@pytest.mark.parametrize("preset", ["deepseek-v3", "paper", "small", "tiny"])
def test_parameter_counts_match_the_config_arithmetic(preset):
    c = load_config(preset)
    p = parameter_counts(c)
    total, active = by_hand(c)
    assert p["all"]["total"] == total and p["all"]["activated"] == pytest.approx(active)
    if preset == "deepseek-v3":  # as published, without the 14B MTP module: 671B, about 37B activated
        assert round(total / 1e9, 2) == 671.03 and 37.0 <= active / 1e9 < 38.0


def test_memory_per_gpu_items():
    c = load_config("paper")
    load = GpuLoad(sequences=8, context=4096, tokens=4096)
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    for ep, per_slot in ((256, 1), (64, 4)):
        fp8 = memory_per_gpu(c, Layout(ep), load, expert_dtype="fp8")
        bf16 = memory_per_gpu(c, Layout(ep), load, expert_dtype="bf16")
        assert fp8["routed_experts"] == pytest.approx(per_slot * moe_layers * expert * (1 + 4 / 128**2))
        assert bf16["routed_experts"] == pytest.approx(2 * per_slot * moe_layers * expert)
        assert fp8["kv_cache"] == 8 * 4096 * (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 2
        assert fp8["replicated_weights"] == bf16["replicated_weights"]
        assert fp8["total"] == pytest.approx(sum(v for k, v in fp8.items() if k != "total"))


def test_plan_json(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", "paper", "--ranks", "16", "--experts-dtype", "bf16", "--hardware", "h100-sxm",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["params_total"] == parameter_counts(load_config("paper"))["all"]["total"]
    assert r["fits"] is False and r["memory_per_gpu_bytes"]["total"] > 80 * 2**30  # 16 experts of 58 layers in BF16
    assert main(["plan", "--config", "paper", "--ranks", "256", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["fits"] is True and r["hardware"] == "h100-sxm"
    for mode, key in (("prefill", "predicted_input_tokens_per_s"), ("decode", "predicted_output_tokens_per_s")):
        pred = r["predicted"][mode]
        assert r["predicted_step_ms"][mode] == pred["step_ms"] > 0
        assert r[key] == pytest.approx(256 * pred["tokens_per_gpu"] / pred["step_ms"] * 1e3)


def test_predicted_flops_are_twice_the_activated_parameters():
    """A decode token against a one-position cache does ~2 FLOPs per activated parameter (all but the
    embedding lookup), plus the attention scores; independent of the EP size. (Dispatch and combine
    move rows: their local passes are not parameters.)"""
    c = load_config("deepseek-v3")
    hw = load_hardware("h100-sxm")
    _, active = by_hand(c)
    scores = c.num_hidden_layers * 2 * c.num_attention_heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
    for ep in (16, 256):
        r = predict_step(c, Layout(ep), hw, mode="decode", tokens=1, sequences=4, context=1, expert_fp8=True)
        flops = r["head"]["flops"] + sum(L["count"] * ph["flops"] for L in r["layers"].values()
                                          for name, ph in L["phases"].items() if name not in ("dispatch", "combine"))
        expect = 4 * (2 * (active - c.vocab_size * c.hidden_size - c.hidden_size) + scores)
        assert flops == pytest.approx(expect, rel=1e-9)


def _routed(c, tokens: int, seed: int = 0) -> np.ndarray:
    """Experts [tokens, K] drawn as group-limited routing does under uniform scores: topk_group of
    the groups, then K distinct experts among theirs."""
    rng = np.random.default_rng(seed)
    size = c.n_routed_experts // c.n_group
    groups = np.argsort(rng.random((tokens, c.n_group)), axis=1)[:, :c.topk_group]
    members = (groups[:, :, None] * size + np.arange(size)).reshape(tokens, -1)
    pick = np.argsort(rng.random(members.shape), axis=1)[:, :c.num_experts_per_tok]
    return np.take_along_axis(members, pick, axis=1)


@pytest.mark.parametrize("preset, ep, rpn", [("tiny", 2, 2), ("small", 8, 4), ("paper", 64, 8)])
def test_reach_matches_drawn_routing(preset, ep, rpn):
    c = load_config(preset)
    e_TK = _routed(c, 20000)
    per_slot = c.n_routed_experts // ep
    for owner in (lambda e: e // per_slot, lambda e: e // per_slot // rpn):
        drawn = np.mean([len(set(owner(e) for e in row)) for row in e_TK])
        assert reach(c, [owner(e) for e in range(c.n_routed_experts)]) == pytest.approx(drawn, rel=0.01)


def test_predicted_regimes_and_links():
    c, hw = load_config("paper"), load_hardware("seeds-h100")
    kw = dict(tokens=4096, sequences=8, context=4096, expert_fp8=True)
    dec = predict_step(c, Layout(256), hw, mode="decode", **kw)
    pre = predict_step(c, Layout(256), hw, mode="prefill", dispatch="hierarchical", **kw)
    assert dec["layers"]["moe"]["phases"]["routed_experts"]["bound"] == "memory"  # 8 rows against the weights
    assert pre["layers"]["moe"]["phases"]["routed_experts"]["bound"] == "compute"
    flat = predict_step(c, Layout(256), hw, mode="prefill", dispatch="flat", **kw)["layers"]["moe"]["exchange"]
    hier = pre["layers"]["moe"]["exchange"]
    H, K = c.hidden_size, c.num_experts_per_tok
    there_and_back = (H * 2 + 8 * K) + H * 2  # BF16 token, expert ids and weights; the BF16 sum back
    # flat, one expert a GPU: a token's K experts are K ranks, each bound for another node crosses
    assert flat["dispatch_and_combine"]["inter_node_bytes"] == pytest.approx(4096 * K * (256 - 8) / 256 * there_and_back)
    # hierarchical: 4 of 8 groups of 4 nodes: 16 nodes of 8 experts reachable, K of their 128 experts
    reached = 16 * (1 - math.comb(120, K) / math.comb(128, K)) * 31 / 32
    assert hier["dispatch_and_combine"]["inter_node_bytes"] == pytest.approx(4096 * reached * there_and_back)
    fp8 = predict_step(c, Layout(256), hw, mode="prefill", dispatch="flat", payload="fp8", **kw)["layers"]["moe"]
    assert fp8["exchange"]["dispatch_and_combine"]["inter_node_bytes"] == pytest.approx(
        4096 * K * 248 / 256 * ((H + 4 * H // 128 + 8 * K) + H * 2))
    fast = replace(hw, inter_node=replace(hw.inter_node, bytes_per_s=2 * hw.inter_node.bytes_per_s))
    assert predict_step(c, Layout(256), fast, mode="prefill", dispatch="hierarchical", **kw)["step_ms"] < pre["step_ms"]
    two = predict_step(c, Layout(256), hw, mode="prefill", dispatch="hierarchical", micro_batches=2, **kw)
    assert two["layers"]["moe"]["exposed_comm_ms"] < pre["layers"]["moe"]["exposed_comm_ms"]


def test_ranks_sharing_a_device_divide_its_rates():
    """8 ranks on 2 cores: each gets 2 / (1 + 7 c) of a core while it computes, c the share of its
    compute time another rank computes too (1 without a calibration); 2 ranks keep a core each."""
    c = load_config("small")
    hw = replace(load_hardware("cpu-2core"), concurrency={}, oversubscribed_efficiency=1.0)
    kw = dict(mode="prefill", tokens=512, sequences=8, context=64, expert_fp8=False)
    two, eight = (predict_step(c, Layout(8, ranks_per_node=8), hw, ranks_per_host=n, **kw) for n in (2, 8))
    assert (two["device_share"], eight["device_share"]) == (1.0, 0.25)
    a, b = two["layers"]["moe"]["phases"]["routed_experts"], eight["layers"]["moe"]["phases"]["routed_experts"]
    fixed = hw.rate("routed_experts", "prefill").overhead_s * 1e3
    assert b["ms"] - fixed == pytest.approx(4 * (a["ms"] - fixed))
    # with a concurrency line, the share and the predicted busy fraction agree
    line = replace(hw, concurrency={"intercept": 0.1, "slope": 0.8}, oversubscribed_efficiency=0.8)
    r = predict_step(c, Layout(8, ranks_per_node=8), line, ranks_per_host=8, **kw)
    exposed = sum(L["count"] * L["exposed_comm_ms"] for L in r["layers"].values())
    assert r["busy"] == pytest.approx(1 - exposed / r["step_ms"], abs=1e-3)
    assert r["device_share"] == pytest.approx(2 / (1 + 7 * (0.1 + 0.8 * r["busy"])) * 0.8, rel=1e-3)


def test_nics_per_node_sets_the_inter_node_bandwidth(tmp_path):
    out = {n: tmp_path / f"{n}.json" for n in (2, 8)}
    for n, path in out.items():
        assert main(["plan", "--config", "paper", "--ranks", "64", "--nics-per-node", str(n), "--json", str(path)]) == 0
    r = {n: json.loads(p.read_text())["predicted"]["prefill"]["layers"]["moe"]["exchange"]["dispatch_and_combine"]
         for n, p in out.items()}
    hw = load_hardware("h100-sxm")
    assert r[8]["inter_node_bytes"] == r[2]["inter_node_bytes"]
    # ms = messages x latency + bytes / (bandwidth x efficiency): four times the bandwidth, a quarter of the
    # byte time; hierarchical dispatch (auto, across nodes) sends one message a remote node each way
    lat = 2 * (64 // 8 - 1) * hw.inter_node.latency_s * 1e3
    assert r[2]["inter_node_ms"] - lat == pytest.approx(4 * (r[8]["inter_node_ms"] - lat))


def test_fit_phase_recovers_a_known_roofline():
    """Samples drawn from a roofline with a fixed cost (and 3% noise) give back its parameters."""
    rng = np.random.default_rng(0)
    peak, bw, truth = 1e11, 2.5e10, PhaseRate(0.42, 0.31, 2e-4)
    flops, nbytes = 10 ** rng.uniform(5, 10, 300), 10 ** rng.uniform(4, 9, 300)
    calls, share = rng.choice([1, 2], 300), rng.choice([1.0, 0.5, 0.25], 300)
    t = truth.overhead_s * calls + np.maximum(flops / (peak * truth.flops_efficiency * share),
                                              nbytes / (bw * truth.hbm_efficiency * share))
    rows = list(zip(flops, nbytes, calls, share, t * rng.normal(1, 0.03, 300)))
    rate, err = fit_phase(rows, peak, bw, PhaseRate(0.5, 0.5))
    assert rate.flops_efficiency == pytest.approx(0.42, rel=0.1) and rate.hbm_efficiency == pytest.approx(0.31, rel=0.1)
    assert rate.overhead_s == pytest.approx(2e-4, rel=0.25) and err < 0.05


def test_fit_link_recovers_latency_and_bandwidth():
    rng = np.random.default_rng(1)
    truth = Link(2.6e10, 3e-5, 0.05)
    nbytes, msgs = 10 ** rng.uniform(4, 7, 200), rng.choice([2, 6, 14], 200)
    hidden = rng.uniform(0, 1e-3, 200)
    exposed = np.maximum(0, truth.seconds(nbytes, msgs) - hidden)
    rows = list(zip(nbytes, np.zeros(200), msgs, np.zeros(200), np.ones(200), hidden, exposed, np.full(200, 0.01),
                    np.zeros(200)))
    fit = fit_link(rows, Link(2.6e10, 0.0, 1.0), 0, None)
    assert fit.efficiency == pytest.approx(0.05, rel=0.1) and fit.latency_s == pytest.approx(3e-5, rel=0.3)
    # the inter-node link, the intra-node one known: each layer takes the longer of the two; ranks
    # that share devices wait 2 ms an all-to-all per rank a device beyond one
    inter = Link(2.6e10, 1e-4, 0.02)
    cross, over = 10 ** rng.uniform(4, 7, 200), rng.choice([0.0, 6.0], 200)
    exposed = np.maximum(0, np.maximum(truth.seconds(nbytes, msgs), inter.seconds(cross, 2 * msgs)) - hidden) + over * 2e-3
    rows = list(zip(nbytes, cross, msgs, 2 * msgs, np.ones(200), hidden, exposed, np.full(200, 0.01), over))
    fit = fit_link(rows, Link(2.6e10, 0.0, 1.0), 1, truth, sync_s=2e-3)
    assert fit.efficiency == pytest.approx(0.02, rel=0.1) and fit.latency_s == pytest.approx(1e-4, rel=0.3)


def test_calibration_input_errors(tmp_path, capsys):
    assert main(["plan", "--calibrate", str(tmp_path / "none.h5")]) == 2
    assert main(["plan", "--ranks", "16", "--save", str(tmp_path / "hw.json")]) == 2
    assert main(["plan", "--validate", str(tmp_path / "none.h5"), "--ranks", "16", "--nics-per-node", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "none.h5" in err[0] and "--save needs --calibrate" in err[1]
    assert "drop --ranks, --nics-per-node" in err[2]
    assert not (tmp_path / "hw.json").exists()


def test_plan_hardware_errors(tmp_path, capsys):
    assert main(["plan", "--ranks", "16", "--hardware", "a100-imaginary"]) == 2
    bad = tmp_path / "hw.json"
    bad.write_text(json.dumps({"flops_per_s": {"bf16": 1e15}}))
    assert main(["plan", "--ranks", "16", "--hardware", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "a100-imaginary" in err[0] and "not a hardware file" in err[1]


def test_plan_sweep(tmp_path):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert main(["plan", "--config", "paper", "--sweep-ep", "64,16", "--sweep-sequences", "8,64",
                 "--json", str(out), "--sweep-plot", str(png)]) == 0
    rows = json.loads(out.read_text())["sweep"]
    assert [(r["ep"], r["sequences"]) for r in rows] == [(16, 8), (16, 64), (64, 8), (64, 64)]
    assert main(["plan", "--config", "paper", "--ranks", "64", "--sequences", "64", "--json",
                 str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert rows[3]["decode_step_ms"] == one["predicted_step_ms"]["decode"] and rows[3]["fits"] == one["fits"]
    assert rows[0]["scaling_efficiency"] == 1.0 and rows[2]["scaling_efficiency"] == pytest.approx(
        rows[2]["decode_tokens_per_s_per_gpu"] / rows[0]["decode_tokens_per_s_per_gpu"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["plan", "--config", "paper", "--ranks", "16", "--sweep-plot", str(png)]) == 2


def test_links_from_a_trace_replace_the_files_links(tmp_path, capsys):
    lk = Links(np.array([[4e9, 1e8, 2e8], [1e8, 5e9, 3e8], [2e8, 3e8, np.nan]]),
               np.array([[1e-6, 1e-4, 2e-4], [1e-4, 2e-6, 3e-4], [2e-4, 3e-4, np.nan]]), 1 << 20)
    hw = load_hardware("h100-sxm").with_links(lk, "t.h5")
    assert hw.inter_node == Link(2e8, 2e-4, 1.0) and hw.intra_node == Link(4.5e9, 1.5e-6, 1.0)
    assert hw.name == "h100-sxm, links of t.h5" and hw.phases == load_hardware("h100-sxm").phases
    write_synthetic(tmp_path / "t.h5")  # its links: 2 GB/s inside a node, 0.1 GB/s between
    out = tmp_path / "p.json"
    assert main(["plan", "--config", "tiny", "--ranks", "4", "--ranks-per-node", "2", "--hardware", "cpu-2core",
                 "--links-from", str(tmp_path / "t.h5"), "--json", str(out)]) == 0
    assert "links of t.h5" in json.loads(out.read_text())["hardware"]
    with TraceWriter(tmp_path / "none.h5", meta(links=None), **layout(Dims())):
        pass
    assert main(["plan", "--config", "tiny", "--ranks", "4", "--links-from", str(tmp_path / "none.h5")]) == 2
    assert "has no measured links" in capsys.readouterr().err


def test_plan_takes_the_run_it_plans(tmp_path):
    """The same workload flags: plan's tokens a step are what run records, and its per-GPU figures
    are those of the run's busiest GPU."""
    flags = ["--mode", "prefill", "--batch", "uniform:4,12", "--seq-len", "uniform:8,40", "--steps", "5",
             "--warmup", "1", "--seed", "3"]
    assert main(["run", "--config", "tiny", *flags, "--trace", str(tmp_path / "t.h5")]) == 0
    assert main(["plan", "--config", "tiny", "--ranks", "2", "--hardware", "cpu-2core", *flags,
                 "--json", str(tmp_path / "p.json")]) == 0
    t, run = read_trace(tmp_path / "t.h5"), json.loads((tmp_path / "p.json").read_text())["run"]
    assert run["input_tokens_per_step"] == pytest.approx(t.input_tokens.mean())
    assert run["output_tokens_per_step"] == pytest.approx(t.output_tokens.mean())
    assert run["tokens"] == math.ceil(t.input_tokens.mean() / 2) and run["steps"] == 5
    for bad in (["--mode", "decode", "--sweep-ep", "4"], ["--overlap", "on"]):
        assert main(["plan", "--config", "tiny", "--hardware", "cpu-2core", *bad]) == 2


def test_plan_prices_every_placement_of_measured_loads(tmp_path, capsys):
    """--loads-from: every policy's rank load, bytes and predicted step, the cheapest chosen and
    planned with; --eplb forces one."""
    assert main(["run", "--config", "tiny", "--routing", "zipf:1.5", "--mode", "prefill", "--batch", "8",
                 "--seq-len", "16", "--steps", "2", "--warmup", "0", "--trace", str(tmp_path / "t.h5")]) == 0
    capsys.readouterr()
    plan = ["plan", "--config", "tiny", "--ranks", "8", "--ranks-per-node", "4", "--hardware", "cpu-2core",
            "--loads-from", str(tmp_path / "t.h5")]
    assert main([*plan, "--json", str(tmp_path / "p.json")]) == 0
    text = capsys.readouterr().out
    assert "predicted prefill step" in text and text.count("<- chosen") == 1
    cands = json.loads((tmp_path / "p.json").read_text())["placement_candidates"]
    # cut joins where the loads leave spare places to cut with (it is global's placement otherwise)
    assert [c["policy"] for c in cands][:4] == ["hierarchical", "global", "hierarchical-refined", "global-refined"]
    assert [c["policy"] for c in cands][4:] in ([], ["cut"])
    chosen = [c for c in cands if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["predicted_step_ms"] <= min(c["predicted_step_ms"] for c in cands) * 1.001
    assert all(c["rank_load"] >= 1.0 and c["inter_node_bytes"] > 0 for c in cands)
    assert main([*plan, "--eplb", "global", "--json", str(tmp_path / "g.json")]) == 0
    assert [c["policy"] for c in json.loads((tmp_path / "g.json").read_text())["placement_candidates"]] == ["global"]
