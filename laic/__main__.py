"""``python -m laic ...``: the ``laic`` command, for where its console script is not on PATH (and for
``torchrun -m laic``)."""
import sys

from .cli import console_main

if __name__ == "__main__":
    sys.exit(console_main())
