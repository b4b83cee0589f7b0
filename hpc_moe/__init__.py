"""hpc_moe: large expert-parallel inference of DeepSeek-V3-class MoE models over MPI."""
__version__ = "0.1.0"
