"""Model math: latent-cache decode against recomputation, ragged batches, routing, configs."""
import json

import numpy as np
import pytest

from hpc_moe.backend import get_backend
from hpc_moe.config import ConfigError, ModelConfig, load_config
from hpc_moe.errors import UsageError
from hpc_moe.model.generate import generate
from hpc_moe.model.kvcache import Batch
from hpc_moe.model.router import route, update_bias
from hpc_moe.model.transformer import Model
from hpc_moe.weights.synthetic import SyntheticWeights


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny")
    return Model(cfg, SyntheticWeights(cfg, seed=1), get_backend("numpy"))


def test_decode_with_latent_cache_equals_recomputation(tiny):
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, tiny.cfg.vocab_size, 9)
    gen = generate(tiny, [prompt], 6)
    # Each decoded token's logits, recomputed by a full prefill of the sequence so far.
    seq = np.concatenate([prompt, gen.tokens[0]])
    full = generate(tiny, [seq[:-1]], 0).prefill_logits[0]
    cache = tiny.new_cache(1, 32)
    tiny.forward(Batch.prefill([prompt]), cache)
    for step in range(5):
        pos = len(prompt) + step
        step_logits = tiny.forward(Batch.decode([seq[pos]], [0], [pos]), cache)[0]
        assert rel(step_logits, full[pos]) <= 1e-5
        assert step_logits.argmax() == seq[pos + 1]


def test_ragged_batch_equals_one_by_one(tiny):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, tiny.cfg.vocab_size, n) for n in (5, 1, 12, 7)]
    together = generate(tiny, prompts, 5)
    for b, p in enumerate(prompts):
        alone = generate(tiny, [p], 5)
        assert rel(together.prefill_logits[b], alone.prefill_logits[0]) <= 1e-5
        np.testing.assert_array_equal(together.tokens[b], alone.tokens[0])


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_last_only_logits_are_the_last_rows(tiny, micro_batches):
    """forward(last_only=True), what run asks for, gives each sequence's last-position logits of
    the full forward, and nothing for an empty batch."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, tiny.cfg.vocab_size, n) for n in (5, 1, 12)]
    full = tiny.forward(Batch.prefill(prompts), tiny.new_cache(3, 16), micro_batches)
    last = tiny.forward(Batch.prefill(prompts), tiny.new_cache(3, 16), micro_batches, last_only=True)
    assert last.shape == (3, tiny.cfg.vocab_size)
    assert rel(last, full[np.cumsum([5, 1, 12]) - 1]) <= 1e-6
    assert tiny.forward(Batch.prefill([]), tiny.new_cache(1, 4), last_only=True).shape == (0, tiny.cfg.vocab_size)


def test_empty_batch_still_runs_every_layer(tiny):
    gen = generate(tiny, [], 3)
    assert gen.tokens.shape == (0, 3) and gen.prefill_logits == []


def test_truncated_model_runs_fewer_layers():
    cfg = load_config("tiny")
    m = Model(cfg, SyntheticWeights(cfg, seed=1), get_backend("numpy"), num_layers=2)
    assert len(m.attn) == 2
    with pytest.raises(ValueError, match="num_layers"):
        Model(cfg, SyntheticWeights(cfg), get_backend("numpy"), num_layers=9)


def test_router_group_limit_and_weights():
    cfg = load_config("tiny")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, cfg.hidden_size)).astype(np.float32)
    gate = rng.standard_normal((cfg.n_routed_experts, cfg.hidden_size)).astype(np.float32) * 0.3
    bias = rng.uniform(-0.05, 0.05, cfg.n_routed_experts).astype(np.float32)
    r = route(x, gate, bias, cfg)
    per_group = cfg.n_routed_experts // cfg.n_group
    for t in range(64):
        assert len(set(r.topk_idx_TK[t] // per_group)) <= cfg.topk_group
        assert len(set(r.topk_idx_TK[t])) == cfg.num_experts_per_tok
    np.testing.assert_allclose(r.topk_weight_TK.sum(1), cfg.routed_scaling_factor, rtol=1e-5)
    # Brute force: the best topk_group groups by top-2 biased score, then the best experts inside.
    s = 1 / (1 + np.exp(-(x @ gate.T)))
    for t in range(64):
        c = s[t] + bias
        g = np.sort(c.reshape(cfg.n_group, -1), axis=1)[:, -2:].sum(1)
        allowed = np.isin(np.arange(cfg.n_routed_experts) // per_group, np.argsort(-g)[:cfg.topk_group])
        best = np.argsort(-np.where(allowed, c, -np.inf))[:cfg.num_experts_per_tok]
        assert set(best) == set(r.topk_idx_TK[t])


def test_bias_update_moves_toward_balance():
    bias = np.zeros(4, np.float32)
    out = update_bias(bias, np.array([10, 0, 5, 5]), rate=0.01)
    np.testing.assert_allclose(out, [-0.01, 0.01, 0, 0])


@pytest.mark.parametrize("change, message", [
    ({"n_group": 3}, "n_routed_experts must be divisible by n_group"),
    ({"topk_group": 9}, "topk_group must be in"),
    ({"num_experts_per_tok": 100}, "num_experts_per_tok must be in"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim must be even"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"q_lora_rank": -3}, "q_lora_rank must be null or a positive integer"),
    ({"scoring_func": "softmax"}, "scoring_func must be 'sigmoid'"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type must be 'yarn'"),
    ({"quantization_config": {"quant_method": "awq"}}, "quant_method must be 'fp8'"),
])
def test_bad_config_names_field_and_rule(change, message):
    d = load_config("tiny").to_dict()
    d.update(change)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(d)


def test_bad_config_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="no config file or preset named 'nope'"):
        load_config("nope")


def test_both_rope_spellings_agree():
    d = load_config("tiny").to_dict()
    new = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta")}
    scaling = {k: v for k, v in d["rope_scaling"].items() if k != "type"}
    new["rope_parameters"] = {"rope_type": "yarn", "rope_theta": d["rope_theta"], **scaling}
    assert ModelConfig.from_dict(new) == ModelConfig.from_dict(d)


def test_presets_load_and_round_trip(tmp_path):
    for name in ("tiny", "small", "paper", "deepseek-v3"):
        cfg = load_config(name)
        cfg.save(str(tmp_path / "c.json"))
        assert load_config(str(tmp_path / "c.json")) == cfg
    paper = load_config("paper")
    assert (paper.num_hidden_layers, paper.first_k_dense_replace, paper.hidden_size) == (61, 3, 7168)
    assert paper.num_attention_heads * paper.v_head_dim == 7168 and paper.intermediate_size == 18432
    v3 = json.load(open(load_config.__globals__["PRESET_DIR"] + "/deepseek-v3.json"))
    assert v3["n_routed_experts"] == 256 and load_config("deepseek-v3").fp8_block == (128, 128)


@pytest.mark.parametrize("kind", ["uniform", "zipf:1.5", "one"])
def test_synthetic_routing_distinct_experts_and_imbalance(kind):
    from hpc_moe.model.router import SyntheticRouting, expert_counts
    cfg = load_config("small")
    r = SyntheticRouting.parse(kind, seed=3)(np.zeros((4000, 4), np.float32), cfg, layer=1, call=1)
    idx = r.topk_idx_TK
    assert all(len(set(row)) == cfg.num_experts_per_tok for row in idx[:200])
    np.testing.assert_allclose(r.topk_weight_TK.sum(1), cfg.routed_scaling_factor, rtol=1e-5)
    counts = expert_counts(idx, cfg.n_routed_experts)
    assert counts.sum() == 4000 * cfg.num_experts_per_tok
    imbalance = counts.max() / counts.mean()
    # "one": the same K experts take every token, so max / mean = E / K.
    expected = {"uniform": (1.0, 1.2), "zipf:1.5": (2.0, 20.0), "one": (3.99, 4.01)}[kind]
    assert expected[0] <= imbalance <= expected[1]
    with pytest.raises(UsageError, match="routing must be"):
        SyntheticRouting.parse("zipf:-1")


def test_mixed_batch_of_prefills_and_decodes(tiny):
    """A continuous-batching step: one sequence prefills while two others decode."""
    rng = np.random.default_rng(4)
    a, b, c = (rng.integers(0, tiny.cfg.vocab_size, n) for n in (6, 4, 9))
    # Reference: each sequence alone, the decoding ones one token after their prompt.
    want_a = generate(tiny, [a], 0).prefill_logits[0]
    want_b = generate(tiny, [b], 0).prefill_logits[0][-1]
    want_c = generate(tiny, [c], 0).prefill_logits[0][-1]
    cache = tiny.new_cache(3, 16)
    tiny.forward(Batch.prefill([b[:-1], c[:-1]], slots=[1, 2]), cache)
    mixed = Batch(np.concatenate([a, b[-1:], c[-1:]]), np.array([0, 1, 2]), np.array([0, 3, 8]),
                  np.array([6, 1, 1]))
    logits = tiny.forward(mixed, cache)
    assert rel(logits[:6], want_a) <= 1e-5
    assert rel(logits[6], want_b) <= 1e-5 and rel(logits[7], want_c) <= 1e-5


def test_zipf_popularity_persists_across_ranks_and_calls_and_drifts():
    from hpc_moe.model.router import SyntheticRouting, expert_counts
    cfg = load_config("small")
    x = np.zeros((3000, 4), np.float32)
    a, b = SyntheticRouting.parse("zipf:1.5", seed=3, stream=0), SyntheticRouting.parse("zipf:1.5", seed=3, stream=5)
    ca = expert_counts(a(x, cfg, layer=1, call=1).topk_idx_TK, cfg.n_routed_experts)
    cb = expert_counts(b(x, cfg, layer=1, call=40).topk_idx_TK, cfg.n_routed_experts)
    hot = np.argsort(-a.log_popularity(cfg.n_routed_experts, 1, 1))[:3]
    assert set(np.argsort(-ca)[:3]) == set(hot) == set(np.argsort(-cb)[:3])  # other rank, later call: same hot experts
    assert not np.array_equal(a(x, cfg, 1, 1).topk_idx_TK, b(x, cfg, 1, 1).topk_idx_TK)  # but its own tokens
    other_layer = np.argsort(-a.log_popularity(cfg.n_routed_experts, 2, 1))[:3]
    assert set(other_layer) != set(hot)
    d = SyntheticRouting.parse("zipf:1.5,drift:0.1", seed=3)
    np.testing.assert_array_equal(d.log_popularity(32, 1, 0), a.log_popularity(32, 1, 0))
    assert not np.array_equal(d.log_popularity(32, 1, 5), d.log_popularity(32, 1, 0))  # halfway to the next draw
    fresh = d.log_popularity(32, 1, 10)  # 1/drift calls later: a pure new draw, the same Zipf values reshuffled
    np.testing.assert_allclose(np.sort(fresh), np.sort(a.log_popularity(32, 1, 0)))
    assert not np.array_equal(fresh, a.log_popularity(32, 1, 0))
    for bad in ("zipf:1.5,drift:2", "zipf:1.5,speed:1", "zipf:x"):
        with pytest.raises(UsageError, match="routing must be"):
            SyntheticRouting.parse(bad)
