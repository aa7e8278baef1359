"""``python -m egressgw.lab up|demo|status|node-down|node-up|down``: the lab commands without the
main CLI."""

from egressgw.lab.cli import main

raise SystemExit(main())
