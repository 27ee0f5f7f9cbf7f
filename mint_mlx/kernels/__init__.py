"""Our own Metal kernels for extended formats, with a pure-MLX reference for every one.

``spec`` declares each kernel once; ``affine`` and friends dispatch to Metal on Apple GPUs and to
the reference elsewhere; ``emulate`` compiles and runs the same kernel sources on a CPU for tests.
"""
