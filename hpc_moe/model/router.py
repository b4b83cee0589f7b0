"""DeepSeek-V3 routing: sigmoid scores, bias-corrected group-limited top-k, and load statistics.

Shape legend: T tokens, D hidden size, E routed experts, G routing groups, K experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpc_moe.config import ModelConfig
from hpc_moe.errors import UsageError
from hpc_moe.model.layers import array_module, linear


@dataclass(frozen=True)
class Routing:
    """The router's decision for a batch of tokens.

    topk_idx_TK: int64 [T, K] global expert ids, in descending order of biased score.
    topk_weight_TK: float32 [T, K] combine weights (normalised if norm_topk_prob, times
    routed_scaling_factor).
    """

    topk_idx_TK: object
    topk_weight_TK: object


def route(x_TD, gate_ED, bias_E, cfg: ModelConfig, row_blocked: bool = False) -> Routing:
    """Score tokens x [T, D] against gate [E, D] (float32) with correction bias [E] (float32).

    The bias only steers the choice of experts (aux-loss-free balancing); the combine weights come
    from the unbiased sigmoid scores. Group-limited: a token may only pick experts from the
    ``topk_group`` groups with the highest sum of their two best biased scores. row_blocked: see
    hpc_moe.model.layers.linear.
    """
    xp = array_module(x_TD)
    T, E, G = x_TD.shape[0], cfg.n_routed_experts, cfg.n_group
    logits = linear(x_TD.astype(xp.float32), gate_ED, row_blocked)
    scores = 1.0 / (1.0 + xp.exp(-logits))
    choice = scores + bias_E[None, :]
    grouped = choice.reshape(T, G, E // G)
    top2 = xp.sort(grouped, axis=-1)[..., -2:]
    group_scores = top2.sum(axis=-1)  # [T, G]
    # A group's rank among the token's groups; the best topk_group are kept.
    order = xp.argsort(-group_scores, axis=-1, kind="stable")
    group_mask = xp.argsort(order, axis=-1) < cfg.topk_group
    masked = xp.where(xp.repeat(group_mask, E // G, axis=-1), choice, xp.float32(-xp.inf))
    topk_idx = xp.argsort(-masked, axis=-1, kind="stable")[:, :cfg.num_experts_per_tok]
    weights = xp.take_along_axis(scores, topk_idx, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + xp.float32(1e-20))
    weights = weights * xp.float32(cfg.routed_scaling_factor)
    return Routing(topk_idx.astype(xp.int64), weights.astype(xp.float32))


def expert_counts(topk_idx_TK, n_experts: int) -> np.ndarray:
    """Tokens routed to each expert: int64 [E] on the host (a token counts once per chosen expert)."""
    xp = array_module(topk_idx_TK)
    counts = xp.bincount(topk_idx_TK.reshape(-1), minlength=n_experts)
    return np.asarray(counts.get() if xp is not np else counts, dtype=np.int64)


def topk_changed(topk_a_TK, topk_b_TK):
    """bool [T] (same array module as the inputs): tokens whose set of K experts differs between two
    routings of the same tokens (int64 [T, K] each). Sets, not sequences: the order within a top-k
    follows the biased scores and changes nothing downstream (each weight goes with its expert)."""
    xp = array_module(topk_a_TK)
    return (xp.sort(topk_a_TK, axis=-1) != xp.sort(topk_b_TK, axis=-1)).any(axis=-1)


def update_bias(bias_E: np.ndarray, counts_E: np.ndarray, rate: float) -> np.ndarray:
    """The aux-loss-free balancing rule: bias += rate * sign(mean load - load), float32 [E].

    Raising the bias of under-loaded experts makes the router pick them more often. This changes
    the model's outputs; it is opt-in.
    """
    counts = counts_E.astype(np.float64)
    return (bias_E + rate * np.sign(counts.mean() - counts)).astype(np.float32)


@dataclass(frozen=True)
class SyntheticRouting:
    """Routing decisions drawn from a controlled distribution instead of the model's router, for
    studying the dispatch path under chosen imbalance.

    kind: "uniform" (every expert equally likely), "zipf" (expert popularity ~ 1/rank^s) or "one"
    (every token's experts are the same K, i.e. all tokens go to one expert group: the worst case).
    Each token still gets K distinct experts; weights are random, normalised and scaled like the
    model's.

    The Zipf popularity persists, as real MoE loads do: which experts are hot in a layer is drawn
    once from ``seed``, the same on every rank, so loads measured over a run predict later steps.
    ``drift`` > 0 lets it wander: after 1/drift calls of a layer the popularity has moved to a
    fresh draw, blending linearly in log-popularity between draws. ``stream`` (e.g. the rank)
    seeds the tokens' own draws, which differ per rank and call.
    """

    kind: str
    s: float = 1.2
    drift: float = 0.0
    seed: int = 0
    stream: int = 0

    @classmethod
    def parse(cls, text: str, seed: int = 0, stream: int = 0) -> "SyntheticRouting | None":
        """``model`` -> None; ``uniform``, ``one``, ``zipf``, ``zipf:S`` or ``zipf:S,drift:R``."""
        kind, _, arg = text.partition(":")
        if kind == "model" and not arg:
            return None
        if kind in ("uniform", "one") and not arg:
            return cls(kind, seed=seed, stream=stream)
        if kind == "zipf":
            s_text, _, drift_text = arg.partition(",")
            try:
                s = float(s_text) if s_text else 1.2
                drift = float(drift_text.removeprefix("drift:")) if drift_text.startswith("drift:") else \
                    (0.0 if not drift_text else -1.0)
            except ValueError:
                s, drift = -1.0, -1.0
            if s > 0 and 0 <= drift <= 1:
                return cls("zipf", s, drift, seed, stream)
        raise UsageError(f"routing must be model, uniform, one, zipf[:S] or zipf:S,drift:R with S > 0 and "
                         f"0 <= R <= 1 (got {text!r})")

    def log_popularity(self, n_experts: int, layer: int, call: int) -> np.ndarray:
        """float64 [E] log of each expert's unnormalised popularity at this layer and call."""
        if self.kind == "uniform":
            return np.zeros(n_experts)

        def draw(epoch: int) -> np.ndarray:
            rank_E = np.random.default_rng([self.seed, layer, epoch]).permutation(n_experts)
            return -self.s * np.log1p(rank_E.astype(np.float64))

        if not self.drift:
            return draw(0)
        epoch, frac = divmod(self.drift * call, 1.0)
        return (1 - frac) * draw(int(epoch)) + frac * draw(int(epoch) + 1)

    def __call__(self, x_TD, cfg: ModelConfig, layer: int, call: int) -> Routing:
        """Decisions for x's T tokens at this layer; ``call`` makes successive calls differ."""
        xp = array_module(x_TD)
        T, E, K = x_TD.shape[0], cfg.n_routed_experts, cfg.num_experts_per_tok
        rng = np.random.default_rng([self.seed, self.stream, layer, call])
        if self.kind == "one":
            idx = np.broadcast_to(np.arange(K, dtype=np.int64), (T, K))
        else:
            # Gumbel top-k: K distinct experts drawn without replacement with probability ~ p.
            keys = self.log_popularity(E, layer, call)[None, :] + rng.gumbel(size=(T, E))
            idx = np.argsort(-keys, axis=1)[:, :K].astype(np.int64)
        w = rng.uniform(0.5, 1.0, (T, K))
        w = (w / w.sum(axis=1, keepdims=True) * cfg.routed_scaling_factor).astype(np.float32)
        return Routing(xp.asarray(np.ascontiguousarray(idx)), xp.asarray(w))
