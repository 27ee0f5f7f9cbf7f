"""The numerics of each format: quantize, dequantize, fit scales (optimized, HQQ), per-expert formats."""
