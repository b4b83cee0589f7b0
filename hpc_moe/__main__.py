from hpc_moe.cli import entry

entry()
