"""``python -m pflow.cli`` (and ``torchrun -m pflow.cli``): the ``pflow`` command."""

import sys

from . import main

sys.exit(main())
