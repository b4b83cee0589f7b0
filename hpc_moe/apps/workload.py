"""Workloads of inference benchmarks: what each step asks of the model.

Rank 0 owns the workload: it draws every step's requests (batch size and sequence lengths from a
distribution) with its own seeded generator and hands sequences to ranks.

Distributions are written ``N`` (fixed), ``uniform:LO,HI``, ``normal:MEAN,STD``,
``lognormal:MU,SIGMA`` or ``file:PATH`` (whitespace-separated integers, drawn in order, cycling);
every draw is rounded and clipped to at least 1.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from hpc_moe.errors import InputError

MODES = ("prefill", "decode", "mixed")


class WorkloadError(InputError):
    pass


@dataclass(frozen=True)
class Distribution:
    kind: str
    params: tuple

    @classmethod
    def parse(cls, text: str, what: str) -> "Distribution":
        text = str(text).strip()
        if text.isdigit():
            if int(text) < 1:
                raise WorkloadError(f"{what} must be >= 1 (got {text})")
            return cls("fixed", (int(text),))
        kind, _, rest = text.partition(":")
        if kind == "file":
            try:
                with open(rest) as f:
                    values = tuple(int(v) for v in f.read().split())
            except OSError as e:
                raise WorkloadError(f"{what}: cannot read {rest} ({e.strerror})") from None
            except ValueError:
                raise WorkloadError(f"{what}: {rest} must hold whitespace-separated integers") from None
            if not values or min(values) < 1:
                raise WorkloadError(f"{what}: {rest} must hold at least one integer, all >= 1")
            return cls("file", values)
        try:
            params = tuple(float(v) for v in rest.split(","))
        except ValueError:
            params = ()
        if kind not in ("uniform", "normal", "lognormal") or len(params) != 2:
            raise WorkloadError(f"{what}: expected N, uniform:LO,HI, normal:MEAN,STD, lognormal:MU,SIGMA "
                                f"or file:PATH (got {text!r})")
        if kind == "uniform" and not 1 <= params[0] <= params[1]:
            raise WorkloadError(f"{what}: uniform needs 1 <= LO <= HI (got {text!r})")
        if params[1] < 0:
            raise WorkloadError(f"{what}: the spread must be >= 0 (got {text!r})")
        return cls(kind, params)

    def draw(self, rng: np.random.Generator, n: int, counter: list) -> np.ndarray:
        """n draws as int64 >= 1; ``counter`` is the file position (a one-element list)."""
        if self.kind == "fixed":
            v = np.full(n, self.params[0], dtype=np.float64)
        elif self.kind == "file":
            idx = (counter[0] + np.arange(n)) % len(self.params)
            counter[0] += n
            v = np.asarray(self.params, dtype=np.float64)[idx]
        elif self.kind == "uniform":
            v = rng.uniform(self.params[0], self.params[1] + 1, n)
        elif self.kind == "normal":
            v = rng.normal(*self.params, n)
        else:
            v = rng.lognormal(*self.params, n)
        return np.maximum(1, np.floor(v)).astype(np.int64)

    def upper(self) -> int:
        """A bound on draws, for sizing caches (normal/lognormal: mean + 6 sigma)."""
        if self.kind in ("fixed", "file"):
            return int(max(self.params))
        if self.kind == "uniform":
            return int(self.params[1])
        if self.kind == "normal":
            return int(self.params[0] + 6 * self.params[1]) + 1
        return int(np.exp(self.params[0] + 6 * self.params[1])) + 1


@dataclass(frozen=True)
class Step:
    """One step's requests. prefill_lens: prompt lengths of new sequences (prefill);
    decode_ctx: context lengths of sequences that each decode one token."""

    prefill_lens: np.ndarray
    decode_ctx: np.ndarray

    @property
    def input_tokens(self) -> int:
        return int(self.prefill_lens.sum())

    @property
    def output_tokens(self) -> int:
        # A prefill produces its sequence's first output token; a decode step one more.
        return len(self.prefill_lens) + len(self.decode_ctx)

    @property
    def num_sequences(self) -> int:
        return len(self.prefill_lens) + len(self.decode_ctx)

    @property
    def kind(self) -> str:
        if len(self.decode_ctx) and len(self.prefill_lens):
            return "mixed"
        return "decode" if len(self.decode_ctx) else "prefill"


@dataclass(frozen=True)
class Workload:
    """mode: prefill | decode | mixed. batch: sequences per step; seq_len: prompt length (prefill)
    or context length (decode); mixed steps take ``prefill_fraction`` of the batch as prefills."""

    mode: str
    batch: Distribution
    seq_len: Distribution
    prefill_fraction: float = 0.25
    seed: int = 0
    max_len: int | None = None  # the longest draw: a decode's context leaves room for its new token

    @classmethod
    def create(cls, mode: str, batch: str, seq_len: str, prefill_fraction: float = 0.25,
               seed: int = 0, max_positions: int | None = None) -> "Workload":
        """max_positions: the model's max_position_embeddings. A bounded length distribution that
        reaches past it is an input error; normal and lognormal draws are clipped to it."""
        if mode not in MODES:
            raise WorkloadError(f"workload mode must be one of {', '.join(MODES)} (got {mode!r})")
        if not 0 <= prefill_fraction <= 1:
            raise WorkloadError(f"prefill fraction must be in [0, 1] (got {prefill_fraction})")
        lengths = Distribution.parse(seq_len, "sequence length")
        max_len = None if max_positions is None else max_positions - (mode != "prefill")
        if max_len is not None and lengths.kind in ("fixed", "file", "uniform") and lengths.upper() > max_len:
            raise WorkloadError(f"--seq-len reaches {lengths.upper()} tokens, but the model has "
                                f"max_position_embeddings {max_positions}" + (" (a decode adds a token)"
                                                                              if mode != "prefill" else ""))
        return cls(mode, Distribution.parse(batch, "batch size"), lengths, prefill_fraction, seed, max_len)

    def stream(self, start: int = 0):
        """Steps without end from the ``start``-th on (those before are drawn and dropped), the
        same for a given seed whatever the number of ranks."""
        return itertools.islice(self._draws(), start, None)

    def _draws(self):
        rng = np.random.default_rng(self.seed)
        bc, lc = [0], [0]
        while True:
            b = int(self.batch.draw(rng, 1, bc)[0])
            lens = self.seq_len.draw(rng, b, lc)
            if self.max_len is not None:
                lens = np.minimum(lens, self.max_len)
            if self.mode == "prefill":
                yield Step(lens, np.zeros(0, np.int64))
            elif self.mode == "decode":
                yield Step(np.zeros(0, np.int64), lens)
            else:
                n_pre = int(round(b * self.prefill_fraction))
                yield Step(lens[:n_pre], lens[n_pre:])

    def steps(self, n: int) -> list[Step]:
        """The first n steps of :meth:`stream`."""
        return list(itertools.islice(self.stream(), n))

    def label(self) -> str:
        """The workload as the command line spells it: "prefill, batch 8, seq-len uniform:8,64"."""
        def spell(d) -> str:
            if d.kind == "file":
                return f"from a file of {len(d.params)} values"
            params = ",".join(f"{p:g}" for p in d.params)
            return params if d.kind == "fixed" else f"{d.kind}:{params}"
        mixed = f", prefill fraction {self.prefill_fraction:g}" if self.mode == "mixed" else ""
        return f"{self.mode}, batch {spell(self.batch)}, seq-len {spell(self.seq_len)}{mixed}, seed {self.seed}"

    def describe(self) -> dict:
        return {"mode": self.mode, "batch": [self.batch.kind, list(self.batch.params)],
                "seq_len": [self.seq_len.kind, list(self.seq_len.params)],
                "prefill_fraction": self.prefill_fraction, "seed": self.seed}


def assign(lengths: np.ndarray, ranks: int) -> np.ndarray:
    """Data-parallel attention: sequence -> rank, balancing tokens (longest first to the least loaded).

    lengths int [B] -> int64 [B] rank of each sequence.
    """
    owner = np.zeros(len(lengths), dtype=np.int64)
    load = np.zeros(ranks, dtype=np.int64)
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        r = int(np.argmin(load))
        owner[i] = r
        load[r] += lengths[i]
    return owner
