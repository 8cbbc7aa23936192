"""`python -m blipctl` (also what torchrun runs: `torchrun --nproc_per_node N -m blipctl ...`)."""

from blipctl.cli import main

main()
