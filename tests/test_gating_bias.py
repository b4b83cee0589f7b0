"""The gating bias measured both ways: the top-k change count of MoEBlock.reference_bias and
router.topk_changed, and scripts/gating_bias.py's argument checks (its MPI run: tests/mpi/
test_gating_bias.py).

The skewed load is built, not drawn: tokens whose hidden states lean towards two experts' gate
rows, so those two take most of the top-k picks until the bias steers tokens away from them.
"""
import importlib.util
import os

import numpy as np
import pytest

from hpc_moe.backend import get_backend
from hpc_moe.config import load_config
from hpc_moe.model.moe import LocalExperts, MoEBlock
from hpc_moe.model.router import route, topk_changed, update_bias
from hpc_moe.weights.synthetic import SyntheticWeights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gating_bias", os.path.join(ROOT, "scripts", "gating_bias.py"))
gating_bias = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gating_bias)


def block():
    cfg = load_config("tiny")
    be = get_backend("numpy")
    w = SyntheticWeights(cfg, seed=3)
    layer = cfg.first_k_dense_replace
    return MoEBlock(cfg, layer, w, be, LocalExperts(cfg, w, be, [layer])), cfg


def skewed_tokens(blk, T=256):
    """x [T, D] float32: noise plus the sum of experts 0 and 1's gate rows, so both are hot."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((T, blk.gate.shape[1])).astype(np.float32)
    return x + 3.0 * (blk.gate[0] + blk.gate[1])[None, :] / np.linalg.norm(blk.gate[0] + blk.gate[1])


def test_topk_changed_compares_sets_not_order():
    a = np.array([[0, 1, 2], [3, 4, 5]])
    b = np.array([[2, 1, 0], [3, 4, 6]])
    assert topk_changed(a, b).tolist() == [False, True]


def test_rate_zero_changes_no_token():
    blk, cfg = block()
    x = skewed_tokens(blk)
    counts = np.bincount(route(x, blk.gate, blk.bias, cfg).topk_idx_TK.ravel(), minlength=cfg.n_routed_experts)
    blk.reference_bias = blk.bias.copy()
    blk.update_bias(counts, 0.0)
    blk.route(x)
    assert (blk.topk_changed, blk.topk_seen) == (0, len(x))
    blk.reset_counts()
    assert (blk.topk_changed, blk.topk_seen) == (0, 0)


def test_strong_bias_on_skewed_load_changes_topk_and_levels_it():
    blk, cfg = block()
    x = skewed_tokens(blk)
    blk.reference_bias = blk.bias.copy()

    def load(bias):
        c = np.bincount(route(x, blk.gate, bias, cfg).topk_idx_TK.ravel(), minlength=cfg.n_routed_experts)
        return c, c.max() / c.mean()

    counts, before = load(blk.bias)
    assert before > 2.0  # the built skew: two experts take most picks
    bias = blk.bias
    for _ in range(20):  # the rule as `run` applies it, step after step
        bias = update_bias(bias, load(bias)[0], 0.05)
    after = load(bias)[1]
    blk.bias = bias
    blk.route(x)
    assert blk.topk_changed > 0 and blk.topk_seen == len(x)
    assert after < before


def test_no_reference_bias_no_second_routing():
    blk, _ = block()
    blk.route(skewed_tokens(blk))
    assert (blk.topk_changed, blk.topk_seen) == (0, 0)


@pytest.mark.parametrize("argv, message", [
    (["--rates", "0"], "--rates must be > 0"),
    (["--reps", "0"], "--reps must be >= 1"),
    (["--config", "no-such-preset"], "no config file or preset"),
    (["--prompt-len", "100000"], "max_position_embeddings"),
    (["--checkpoint", "/no/such/dir"], "checkpoint directory not found"),
])
def test_script_rejects_bad_arguments_with_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gating_bias.parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_script_takes_a_checkpoints_config_and_weights():
    a = gating_bias.parse(["--checkpoint", os.path.join(ROOT, "data", "golden", "v3_yarn"), "--rates", "0.01", "0.001"])
    assert a.cfg.n_routed_experts == a.weights.config.n_routed_experts
    assert a.rates == [0.0, 0.001, 0.01]  # rate 0 first: the reference every other rate is compared with
