"""``python -m seeright`` is the ``seeright`` command."""

import sys

from seeright.cli import main

sys.exit(main())
