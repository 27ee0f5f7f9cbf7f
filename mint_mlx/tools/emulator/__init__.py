"""Run our Metal kernels on a CPU (g++), for ``python -m mint_mlx.selftest`` and the tests."""
