"""Tiny models shared by the tests: built once per session, saved, reloaded via from_pretrained."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from helix_daemon.testing.tiny_models import build_tiny_model

_ROOT = Path(tempfile.mkdtemp(prefix="helix-tiny-"))
atexit.register(shutil.rmtree, _ROOT, True)


@functools.cache
def tiny_model(arch: str = "llama", seed: int = 0, **config: int) -> str:
    """Folder of a tiny random-weight model (with tokenizer); the same arguments reuse it."""
    name = "-".join([arch, str(seed), *(f"{k}{v}" for k, v in sorted(config.items()))])
    return str(build_tiny_model(_ROOT / name, arch, seed=seed, **config))
