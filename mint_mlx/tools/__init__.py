"""Not on the conversion path: evaluation, testbeds, stock baselines, the kernel emulator."""
