"""``python -m bqc`` (also what ``torchrun -m bqc`` runs)."""
from bqc.cli import main

main()
