from egressgw.cli import main

raise SystemExit(main())
