"""The daemon side (server, client, CLI) imports without torch or transformers: a client, the
CLI and a daemon whose engine runs in its own process start in a fraction of a second, and
only the engine pays for the model stack."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.daemon_harness import REPO, base_env

DAEMON_SIDE = ["helix_daemon.server.daemon", "helix_daemon.server.run", "helix_daemon.client",
               "helix_daemon.cli.main"]
HEAVY = ["torch", "transformers"]

# Imports the modules one by one in a fresh interpreter and names, for each, the heavy packages
# that first appeared with it (so a failure points at the module that pulled them in).
_PROBE = """
import importlib, json, sys
heavy, blame, seen = sys.argv[1].split(","), {}, set()
for name in sys.argv[2:]:
    importlib.import_module(name)
    now = {m for m in heavy if m in sys.modules}
    blame[name] = sorted(now - seen)
    seen |= now
print(json.dumps(blame))
"""


def test_daemon_side_imports_neither_torch_nor_transformers() -> None:
    """A fresh Python importing the server, client and CLI modules has no torch or
    transformers in ``sys.modules`` afterwards."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, ",".join(HEAVY), *DAEMON_SIDE],
                          env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    blame = json.loads(proc.stdout)
    assert blame == {name: [] for name in DAEMON_SIDE}
