"""``python -m helix_daemon.daemon``: one daemon, its settings from HELIX_* variables."""

import sys

from helix_daemon.config import DaemonConfig
from helix_daemon.server.run import serve

if __name__ == "__main__":
    sys.exit(serve(DaemonConfig.from_env()))
