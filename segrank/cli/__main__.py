"""``python -m segrank.cli``, as the ``segrank`` script."""

import sys

from segrank.cli import main

sys.exit(main())
