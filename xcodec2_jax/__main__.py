"""``python -m xcodec2_jax``: the ``xcodec2-jax`` command line."""

import sys

from .cli import console_main

sys.exit(console_main())
