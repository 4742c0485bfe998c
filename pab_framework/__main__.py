"""`python -m pab_framework run SPEC`: the same commands as `pab` (for torchrun -m)."""
from pab_framework.cli import main

main()
