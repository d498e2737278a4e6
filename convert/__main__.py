"""``python -m convert SRC DST [--verify AUDIO]``: see :mod:`convert.convert`."""

import sys

from .convert import main

sys.exit(main())
