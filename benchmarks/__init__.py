"""Benchmarks of xcodec2_jax against the PyTorch reference; see benchmarks/README.md."""
