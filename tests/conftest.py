"""Shared pytest fixtures: test checkpoints (built on first use, cached), real photos, short videos.

Checkpoints come from tools/make_checkpoints.py (see its docstring for what each kind holds). They are
built once into a cache directory, `$SMOLVLM_TEST_CACHE` or `<repo>/.cache/test-checkpoints/`, under a
name keyed by the builder's version, so a changed builder rebuilds and an old build is never reused.
"""

import os

# Triton reads TRITON_INTERPRET when a kernel is decorated (at import time of the module defining it),
# so on a machine without a CUDA device it must be set before anything imports triton or our kernels:
# the kernels then run on CPU through Triton's interpreter. `torch.cuda.is_available()` only asks the
# driver for a device count (it does not create a CUDA context), so it is cheap to call here.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fcntl  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_make_checkpoints():
    """tools/ is not a package: load tools/make_checkpoints.py as a module by path."""
    name = "smolvlm_tools_make_checkpoints"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / "make_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def make_checkpoints():
    """The checkpoint builder module (tools/make_checkpoints.py), for tests that check its constants."""
    return _load_make_checkpoints()


def _cache_root() -> Path:
    return Path(os.environ.get("SMOLVLM_TEST_CACHE", REPO_ROOT / ".cache" / "test-checkpoints"))


@contextmanager
def _file_lock(path: Path):
    """Serialise builds across processes (e.g. pytest-xdist workers or two engineers' test runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_checkpoint(kind: str) -> Path:
    """The directory of checkpoint `kind`, built (atomically, under a lock) if this version is not cached."""
    builder = _load_make_checkpoints()
    root = _cache_root()
    out = root / f"{kind}-v{builder.BUILDER_VERSION}"
    if (out / "BUILDER_VERSION").is_file():
        return out
    with _file_lock(root / f".{kind}.lock"):
        if not (out / "BUILDER_VERSION").is_file():
            builder.build_atomically(kind, out)
    return out


@pytest.fixture(scope="session")
def processor_dir() -> Path:
    """Processor files only (tokenizer, chat template, real-shape pre/processor configs): seconds to build."""
    return cached_checkpoint("tokenizer")
