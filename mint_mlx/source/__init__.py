"""Opening a source model: its tensors under mlx-lm module paths, their digests, its hub origin."""
