"""Quality: held-out scores, fidelity to a reference, merging baselines, and the sweeps that use them."""
