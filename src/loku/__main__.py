"""``python -m loku ...``: the ``loku`` command (what the console script runs)."""
from loku.cli import main

raise SystemExit(main())
