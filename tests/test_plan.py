"""hpc-moe plan's arithmetic: parameters by kind and memory per GPU, against numbers derived here
from the config's fields (not from the code under test) and the published DeepSeek-V3 figures."""
import json

import pytest

from hpc_moe.cli import main
from hpc_moe.config import load_config
from hpc_moe.perf.footprint import Layout, Workload, memory_per_gpu, parameter_counts


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
    load = Workload(sequences=8, context=4096, tokens=4096)
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
    assert main(["plan", "--config", "paper", "--ranks", "16", "--experts-dtype", "bf16", "--hbm-gib", "80",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["params_total"] == parameter_counts(load_config("paper"))["all"]["total"]
    assert r["fits"] is False and r["memory_per_gpu_bytes"]["total"] > 80 * 2**30  # 16 experts of 58 layers in BF16
    assert main(["plan", "--config", "paper", "--ranks", "256", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["fits"] is True
