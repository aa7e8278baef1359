from egressgw.cli import entry

raise SystemExit(entry())
