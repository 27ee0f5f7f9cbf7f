"""Rate-distortion curves: each tensor's bytes and error in every candidate format."""
