"""The options of the jobs, as frozen dataclasses: the one declaration of every flag of ``run``,
``generate``, ``selftest`` and ``plan`` (help, choices and defaults in each field's metadata,
hpc_moe.flags), from which the command line builds its parsers and then the options.

Each is checked when built (an InputError on every rank alike, before any collective) and travels
explicitly; the trace stores RunOptions as its ``run_config``. MPI-free: imported while parsing.
"""
from __future__ import annotations

from dataclasses import dataclass

from hpc_moe.backend import BACKENDS
from hpc_moe.ep.choices import ALGORITHMS, PAYLOADS, POLICIES, SCHEMES, TRANSPORTS
from hpc_moe.errors import UsageError
from hpc_moe.flags import flag, positive, positive_list

DEFAULT_STEPS = 20  # measured steps of a run given neither --steps nor --duration
DTYPES = ("float32", "bfloat16")  # what the command line offers of hpc_moe.backend's dtypes
EPLB = ("auto", *POLICIES)
_LAYOUT = "parallelism and communication"
_BALANCE = "load balancing"


# The flags several jobs share, one declaration each (a dataclass field is made once per class).
def backend_flag():
    return flag("auto", choices=BACKENDS, help="array module (auto: cupy when a GPU is visible)")


def dtype_flag(help="compute dtype (default float32 on CPU, bfloat16 on GPU)"):
    return flag(None, choices=DTYPES, help=help)


def transport_flag(group=None):
    return flag("auto", choices=TRANSPORTS, group=group,
                help="auto (default): shared memory on one node and host MPI across nodes on the CPU; on GPUs "
                "CUDA-aware MPI, then NCCL, then pinned host buffers")


def payload_flag(group=None, help="dispatch payload: the compute dtype, or FP8 e4m3 with a scale per 128 values"):
    return flag("native", choices=PAYLOADS, group=group, help=help)


def deterministic_flag(group=None):
    return flag(False, group=group,
                help="logits bitwise identical at any rank count, placement, DP and micro-batching (the combine "
                "returns one row per (token, expert) and the source sums them in k order; more combine bytes)")


def allow_shared_gpu_flag(group=None):
    return flag(False, group=group, help="let ranks of a node share a GPU (tests on one GPU)")


def ranks_per_node_flag(group=None, help="simulate nodes of K consecutive ranks (default: the real nodes, from "
                        "shared memory)"):
    return flag(None, type=positive, metavar="K", group=group, help=help)


def dispatch_flag(group=None, help="flat: one exchange over the EP group; hierarchical: each token crosses to a "
                  "node once, then is forwarded inside it; auto (default): hierarchical when there is more than one "
                  "node"):
    return flag("auto", choices=SCHEMES, group=group, help=help)


@dataclass(frozen=True)
class LayoutOptions:
    """Parallel layout, communication, arithmetic and expert placement of run and generate: every
    knob of the engine (``engine_options``)."""

    dp: int = flag(1, type=positive, group=_LAYOUT, help="model replicas (independent EP groups)")
    ranks_per_node: int | None = ranks_per_node_flag(_LAYOUT)
    expert_tp: int = flag(1, type=positive, group=_LAYOUT,
                          help="ranks per expert: each expert's intermediate dimension split over T ranks")
    dispatch: str = dispatch_flag(_LAYOUT)
    algorithm: str = flag("alltoallv", choices=ALGORITHMS, group=_LAYOUT,
                          help="one Ialltoallv per direction, or per-peer messages with experts run as tokens land")
    transport: str = transport_flag(_LAYOUT)
    payload: str = payload_flag(_LAYOUT)
    overlap: str = flag("off", choices=("on", "off"), group=_LAYOUT,
                        help="on: split each step's sequences into micro-batches and overlap one's all-to-all with "
                        "another's compute; off: one batch per step (the baseline of the comparison)")
    micro_batches: int = flag(2, type=positive, group=_LAYOUT, help="micro-batches per step with --overlap on")
    allow_shared_gpu: bool = allow_shared_gpu_flag(_LAYOUT)
    deterministic: bool = deterministic_flag(_LAYOUT)
    eplb: str = flag("auto", choices=EPLB, group=_BALANCE,
                     help="how loads place experts: DeepSeek EPLB's hierarchical (groups packed onto nodes, replicas "
                     "inside them) or global (replicas anywhere) policy, or either -refined (its packing improved by "
                     "swaps of replicas); auto: every policy's placement priced by the planner's cost model (expert "
                     "work of the slowest rank, bytes across and inside nodes on the measured links), the cheapest")
    redundant_experts: int = flag(0, metavar="N", group=_BALANCE,
                                  help="replicas beyond one per expert when experts are colocated (more experts "
                                  "than ranks)")
    backend: str = backend_flag()
    dtype: str | None = dtype_flag()

    def __post_init__(self):
        if self.redundant_experts < 0:
            raise UsageError(f"--redundant-experts must be >= 0 (got {self.redundant_experts})")

    def engine_options(self):
        """hpc_moe.ep.engine.EngineOptions of this layout (imported here: the engine loads MPI, and
        the parser imports this module)."""
        from hpc_moe.ep.dispatch import DispatchOptions
        from hpc_moe.ep.engine import EngineOptions
        return EngineOptions(micro_batches=self.micro_batches if self.overlap == "on" else 1,
                             dispatch=DispatchOptions(self.algorithm, self.transport, self.payload, self.deterministic,
                                                      self.dispatch),
                             eplb=self.eplb, redundant_experts=self.redundant_experts)


_WORKLOAD = "workload"
_OUTPUT = "length and output"


@dataclass(frozen=True)
class RunOptions:
    """``hpc-moe run``: the model, the workload, the length (steps or duration), the outputs, load
    balancing and the layout. steps and duration both None means DEFAULT_STEPS steps."""

    config: str = flag("tiny", exclusive="weights", help="preset name or config.json (synthetic weights)")
    checkpoint: str | None = flag(None, exclusive="weights",
                                  help="HF checkpoint directory (each rank maps only its own experts)")
    layers: int | None = flag(None, type=positive,
                              help="run only the first N layers (for machines that cannot hold the model)")
    seed: int = flag(0, help="seeds weights, workload, tokens and synthetic routing")
    mode: str = flag("prefill", choices=("prefill", "decode", "mixed"), group=_WORKLOAD)
    batch: str = flag("8", group=_WORKLOAD, help="sequences per step: N, uniform:LO,HI, normal:M,S, "
                      "lognormal:MU,SIGMA or file:PATH")
    seq_len: str = flag("64", group=_WORKLOAD, help="prompt length (prefill) or context length (decode); same forms "
                        "as --batch")
    prefill_fraction: float = flag(0.25, group=_WORKLOAD, help="share of prefills in a mixed step")
    routing: str = flag("model", group=_WORKLOAD,
                        help="model (the router), or synthetic: uniform, zipf[:S] (popularity ~ 1/rank^S, the same "
                        "hot experts all run), zipf:S,drift:R (the hot experts move to a fresh draw every 1/R steps) "
                        "or one (all to the same experts)")
    steps: int | None = flag(None, type=int, group=_OUTPUT,
                             help=f"measured steps (default {DEFAULT_STEPS} unless --duration)")
    duration: float | None = flag(None, type=float, group=_OUTPUT, help="measure for this many seconds")
    warmup: int = flag(2, group=_OUTPUT, help="steps run first and not measured")
    trace: str | None = flag("hpc-moe-trace.h5", group=_OUTPUT, help="HDF5 trace to write, or 'none'")
    summary_json: str | None = flag(None, metavar="FILE", group=_OUTPUT,
                                    help="write the summary as JSON (rank 0; keys in docs/trace-format.md)")
    overwrite: bool = flag(False, group=_OUTPUT, help="replace an existing trace file")
    events_every: int = flag(10, group=_OUTPUT, help="record the per-rank timeline every N measured steps (0: never)")
    watchdog: float = flag(600.0, metavar="SECONDS", group=_OUTPUT,
                           help="a rank that waits in communication this long ends the job, naming the ranks that "
                           "do not answer (exit status 4; 0: off)")
    profile: str = flag("on", choices=("on", "off"), group=_OUTPUT,
                        help="time every phase (on a GPU by CUDA events, read once a step: the device is not "
                        "synchronised at each phase)")
    resume: str | None = flag(None, metavar="TRACE.h5", group=_OUTPUT,
                              help="continue the stopped or killed run of this trace from its first step not written, "
                              "with its options, on these ranks (the same or fewer), appending to it")
    baseline: str | None = flag(None, metavar="TRACE.h5", group=_OUTPUT,
                                help="a smaller run of the same scaling series: print scaling efficiency against it")
    loads_from: str | None = flag(None, metavar="TRACE.h5", group=_BALANCE,
                                  help="place experts (replicas, colocation) by the loads an earlier run measured")
    replan_every: int = flag(0, group=_BALANCE,
                             help="re-place experts from the loads measured so far every N steps (outputs unchanged; "
                             "the experts that change owner travel during the next step, in force from the one after)")
    probe_links: str = flag("on", choices=("on", "off"), group=_BALANCE,
                            help="with more than one node: time every node pair's link at the start (about a "
                            "second), record them in the trace, and, placing by loads, give the heaviest nodes' "
                            "experts to the nodes with the fastest links")
    bias_update_rate: float = flag(0.0, group=_BALANCE,
                                   help="aux-loss-free gating bias adjustment per step (changes the model's outputs)")
    layout: LayoutOptions = LayoutOptions()

    def __post_init__(self):
        if self.steps is None and self.duration is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS)
        if self.trace == "none":
            object.__setattr__(self, "trace", None)
        if self.steps is not None and self.duration is not None:
            raise UsageError("give one of --steps and --duration")
        if self.steps is not None and self.steps < 1 or self.duration is not None and self.duration <= 0:
            raise UsageError("--steps must be >= 1 and --duration > 0")
        for name in ("warmup", "events_every", "replan_every"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.watchdog < 0:
            raise UsageError(f"--watchdog must be >= 0 seconds (0: off; got {self.watchdog})")
        if not 0.0 <= self.prefill_fraction <= 1.0:
            raise UsageError(f"--prefill-fraction must be in [0, 1] (got {self.prefill_fraction})")


@dataclass(frozen=True, kw_only=True)
class GenerateOptions:
    """``hpc-moe generate``: weights (checkpoint, or config preset + seed), prompts (input_ids
    .npy), max_new_tokens, output .npz, and the layout."""

    checkpoint: str | None = flag(None, exclusive="weights", help="HF checkpoint directory (config.json + "
                                  "safetensors)")
    config: str | None = flag(None, exclusive="weights", help="preset name or config.json: synthetic weights")
    seed: int = flag(0, help="seed of the synthetic weights (with --config)")
    input_ids: str = flag(help=".npy of int64 [batch, prompt_len] token ids")
    max_new_tokens: int = flag(16)
    output: str = flag(help=".npz to write (prefill_logits, tokens)")
    layout: LayoutOptions = LayoutOptions()

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise UsageError("--max-new-tokens must be >= 0")


@dataclass(frozen=True)
class SelftestOptions:
    """``hpc-moe selftest``: the array module and transport to check, a trace path to try."""

    backend: str = backend_flag()
    dtype: str | None = dtype_flag()
    transport: str = transport_flag()
    trace: str | None = flag(None, help="check that this trace's directory is writable")
    allow_shared_gpu: bool = flag(False, help="let ranks of a node share a GPU")


_RUN = ("the run to plan (as hpc-moe run spells it; sets --sequences, --context and --tokens for its busiest GPU "
        "and predicts its steps)")


@dataclass(frozen=True)
class PlanOptions:
    """``hpc-moe plan``: the deployment (model, ranks, layout, hardware), the run to plan (mode
    None: plan's own sequences, context and tokens), a sweep over EP sizes, or the calibration of
    a hardware file to traces."""

    config: str = flag("deepseek-v3", help="preset name or config.json")
    ranks: int | None = flag(None, type=positive, help="world size")
    ranks_per_node: int | None = flag(None, type=positive, help="default: the hardware's GPUs per node")
    dp: int = flag(1, type=positive)
    expert_tp: int = flag(1, type=positive)
    loads_from: str | None = flag(None, metavar="TRACE.h5", help="place by the loads of an earlier run: print every "
                                  "placement policy's rank load, bytes and predicted step, and plan with the cheapest")
    eplb: str = flag("auto", choices=EPLB,
                     help="with --loads-from: plan this placement policy (auto: the cheapest predicted)")
    layers: int | None = flag(None, type=positive, help="the first N layers only (default: all)")
    experts_dtype: str = flag("auto", choices=("auto", "fp8", "bf16"),
                              help="routed experts in FP8 e4m3 with 128x128 block scales or BF16 (auto: as the "
                              "config's quantization_config says)")
    mode: str | None = flag(None, choices=("prefill", "decode", "mixed"), group=_RUN)
    batch: str = flag("8", group=_RUN, help="sequences per step, as run's --batch (N or a distribution)")
    seq_len: str = flag("64", group=_RUN, help="as run's --seq-len")
    prefill_fraction: float = flag(0.25, group=_RUN, help="as run's")
    steps: int = flag(DEFAULT_STEPS, type=positive, group=_RUN,
                      help="measured steps of the run (its means are over them)")
    warmup: int = flag(2, group=_RUN, help="as run's")
    seed: int = flag(0, group=_RUN, help="as run's: the same seed draws the same steps")
    overlap: str | None = flag(None, choices=("off", "on"), group=_RUN,
                               help="as run's: on is --micro-batches (2 unless given), off is 1")
    sequences: int = flag(8, type=positive, help="sequences per GPU (their latent KV cache)")
    context: int = flag(4096, type=positive, help="positions per sequence")
    tokens: int = flag(4096, type=positive, help="tokens per GPU through a layer at once")
    hardware: str = flag("h100-sxm", metavar="NAME|FILE",
                         help="a device and its links: a name from data/hardware or such a JSON file")
    hbm_gib: float | None = flag(None, type=float, help="GPU memory, GiB (default: the hardware's)")
    dispatch: str = dispatch_flag(help="the all-to-all to predict (auto: hierarchical across nodes, as run does)")
    micro_batches: int = flag(1, type=positive,
                              help="micro-batches whose attention hides another's all-to-all (run --overlap on)")
    placement: bool = flag(False, help="also print the expert placement, slot by slot")
    json: str | None = flag(None, metavar="OUT", help="write the figures as JSON")
    sweep_ep: tuple[int, ...] = flag((), type=positive_list, metavar="N,N,...",
                                     help="instead of one layout: predict these EP sizes (x --dp) at each "
                                     "--sweep-sequences")
    sweep_sequences: tuple[int, ...] = flag((32, 64, 128, 256), type=positive_list, metavar="N,N,...",
                                            help="decode batches per GPU of the sweep")
    sweep_plot: str | None = flag(None, metavar="OUT.png",
                                  help="plot the sweep: throughput per GPU and scaling efficiency")
    payload: str = payload_flag(help="dispatch rows in the compute dtype or FP8 with a scale per 128 values "
                                "(run --payload)")
    attention: str = flag("materialised", choices=("materialised", "fused"),
                          help="hpc_moe's attention kernels (scores in memory) or a fused flash-style kernel's "
                          "traffic")
    nics_per_node: int | None = flag(None, type=positive, metavar="N",
                                     help="the node's inter-node bandwidth is N of the hardware's NICs shared by its "
                                     "GPUs (default: one NIC a GPU)")
    calibrate: tuple[str, ...] = flag((), nargs="+", metavar="TRACE.h5",
                                      help="fit --hardware's fractions reached, fixed costs and links to these traces "
                                      "and show predicted against measured for each")
    validate: tuple[str, ...] = flag((), nargs="+", metavar="TRACE.h5",
                                     help="predict these traces' steps from their shapes on --hardware (or the "
                                     "--calibrate fit) against what they measured; --loads-from sets the expert "
                                     "imbalance")
    save: str | None = flag(None, metavar="FILE.json", help="write the --calibrate fit as a hardware file")
    links_from: str | None = flag(None, metavar="TRACE.h5",
                                  help="the links between and inside nodes as a run measured them at its start (run "
                                  "--probe-links), instead of --hardware's; with --calibrate, the fit finds what an "
                                  "all-to-all reaches of them")

    def __post_init__(self):
        for name in ("calibrate", "validate"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.hbm_gib is not None and not self.hbm_gib > 0:
            raise UsageError(f"--hbm-gib must be > 0 (got {self.hbm_gib:g})")
