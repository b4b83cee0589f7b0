"""The choices of the expert-parallel exchange and placement, MPI-free: the modules that act on
them load MPI, and the command line, which offers them, must not while it parses."""

ALGORITHMS = ("alltoallv", "pipelined")  # one Ialltoallv per direction | per-peer messages
SCHEMES = ("auto", "flat", "hierarchical")  # one exchange over the EP group | across nodes once
PAYLOADS = ("native", "fp8")  # the compute dtype | e4m3 with a float32 scale per 128 values
TRANSPORTS = ("auto", "host", "shm", "cuda-aware", "nccl")
# DeepSeek EPLB's two policies, each followed by the refinement of hpc_moe.ep.packing (swaps of
# replicas between slots: inside each node for hierarchical, anywhere for global), and the loads cut
# into equal pieces whose replicas take unequal shares (hpc_moe.ep.policies).
POLICIES = ("hierarchical", "global", "hierarchical-refined", "global-refined", "cut")
