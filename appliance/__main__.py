"""`python -m appliance ...` runs the `stem` command line (the demo starts workers so)."""

from appliance.cli.main import main

raise SystemExit(main())
