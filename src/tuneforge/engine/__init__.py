"""What every recipe needs around its loop: optimiser and schedule, run directory, metrics, forward pass."""
