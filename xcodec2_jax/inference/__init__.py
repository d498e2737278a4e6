"""Inference: audio I/O, batching plans, compiled programs and their caches, the ``Xcodec2Codec``
facade, long audio in windows, streaming decode and Llasa tokens."""
