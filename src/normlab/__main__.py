"""``python -m normlab``: the ``normlab`` command."""
import sys

from .cli import main

sys.exit(main())
