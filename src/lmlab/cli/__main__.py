"""``python -m lmlab.cli``: the same command line, for launchers such as ``accelerate launch -m``."""

import sys

from lmlab.cli import main

sys.exit(main())
