import sys

from hpc_moe.cli import main

sys.exit(main())
