"""``python -m tests.faults [--quick] [--calls N] ...``: see :mod:`tests.faults.runner`."""

from tests.faults.runner import main

main()
