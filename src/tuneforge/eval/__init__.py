"""Evaluation: held-out loss and generation metrics."""
