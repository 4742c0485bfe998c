"""`python -m pab_framework run SPEC`: the same commands as `pab` (for torchrun -m)."""
from cli import main

main()
