"""`python -m r3rl ...` (and `torchrun --nproc-per-node N -m r3rl train ...`): the `r3rl` command."""

import sys

from r3rl.cli import main

sys.exit(main())
