"""Not on the conversion path: evaluation, testbeds, stock baselines, the kernel emulator.

- :mod:`.evaluation`: perplexity and KL divergence of a model against a reference (library);
  :mod:`.evaluate` is its command line (``python -m mint_mlx.tools.evaluate``).
- :mod:`.testbeds`: real models and text built offline from pinned PyPI wheels (library);
  :mod:`.testbed` is its command line (``python -m mint_mlx.tools.testbed``).
- :mod:`.baselines`: stock mlx-lm quantizations to compare with.
- :mod:`.scales_reference`: the pure-MLX affine scale fit that :mod:`mint_mlx.quant.scales`'s
  numpy fast path replaced, kept as the reference it is tested and benchmarked against.
- :mod:`.emulator`: the Metal kernel emulator (kernels compiled as C++ on Linux).

Command-line modules load OpenBLAS as their first step (:func:`mint_mlx.blas.use_openblas`,
before mlx.core is imported); importing any module here has no such side effect.
"""
