"""Transformer compression techniques: structured pruning (Kwon et al. 2022), token pruning
(LTP-style, calibrated thresholds) and padding removal, on a compact ``SlimEncoder``."""
