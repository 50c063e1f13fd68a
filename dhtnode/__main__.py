"""Allow ``python -m dhtnode``."""

from dhtnode.cli.main import main

raise SystemExit(main())
