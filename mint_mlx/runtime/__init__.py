"""Running extended formats inside mlx-lm: the loader, the layers and our kernels."""
