"""The model layer: Flax modules (``nn/``, semantic, acoustic, FSQ, decoder), ``Xcodec2Model``, the
feature extractor and the parameter layout. Imports only ``config`` and ``utils``."""
