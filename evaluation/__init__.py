"""Evaluation networks and metrics that score generated images (the conditioning probe)."""
