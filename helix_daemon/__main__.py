"""``python -m helix_daemon`` runs the ``helix`` command line."""

from helix_daemon.cli.main import main

raise SystemExit(main())
