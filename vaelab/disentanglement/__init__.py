"""Disentanglement metrics against ground-truth factors; see `vaelab.disentanglement.metrics`."""
