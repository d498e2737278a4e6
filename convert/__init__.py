"""Torch-side tools: convert an X-Codec2 checkpoint to an Orbax Flax checkpoint and verify it."""
