"""``python -m pflow.cli`` (and ``torchrun -m pflow.cli``): the ``pflow`` command."""

import sys

try:
    from . import main
except KeyboardInterrupt:  # Ctrl-C while torch is still importing
    print("pflow: interrupted; nothing written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
