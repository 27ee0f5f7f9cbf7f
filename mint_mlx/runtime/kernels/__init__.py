"""Our own Metal kernels for extended formats, with a pure-MLX reference for every one.

``ops`` is the public entry point (``quantized_matmul``, ``gather_quantized_matmul``,
``dequantize``): our kernels on Apple GPUs, the float32 reference elsewhere. ``quantized``
declares the kernels (``metal/qmv.metal``, ``metal/qmm.metal``) and their launch rules once,
``spec`` turns a declaration into what ``mx.fast.metal_kernel`` takes. The CPU emulator that
compiles and runs the same kernel sources for the tests, and the random cases and tolerance the
tests and ``python -m mint_mlx.selftest`` share, live in :mod:`mint_mlx.tools.emulator`.
"""
