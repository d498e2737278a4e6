"""``python -m xcodec2_jax``: the ``xcodec2-jax`` command line."""

import sys

from .cli import main

sys.exit(main())
