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


@pytest.fixture(scope="session")
def tiny_ckpt() -> Path:
    """Tiny random SmolVLM (vocab 49280, text 64x2 layers, vision 32x2 layers, 64 px tiles, 16 tokens per tile)."""
    return cached_checkpoint("tiny")


@pytest.fixture(scope="session")
def real_ckpt() -> Path:
    """SmolVLM2-256M shape with random weights (1 GB float32 on disk)."""
    return cached_checkpoint("real")


@pytest.fixture(scope="session")
def grafted_ckpt() -> Path:
    """SmolVLM2-256M shape whose text decoder is SmolLM2-135M-Instruct (dequantized Q4_1): real text answers."""
    return cached_checkpoint("grafted")


# ---------------------------------------------------------------------------------------------
# Real images (shipped inside scikit-image: nothing downloads at test time)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Photographs of several sizes and modes, name -> PIL image (size given as width x height)."""
    import skimage.data

    astronaut = Image.fromarray(skimage.data.astronaut())
    return {
        "astronaut": astronaut,  # 512x512 RGB: one exact 512 tile before splitting
        "coffee": Image.fromarray(skimage.data.coffee()),  # 600x400 RGB, landscape
        "chelsea": Image.fromarray(skimage.data.chelsea()),  # 451x300 RGB, odd width
        "rocket": Image.fromarray(skimage.data.rocket()).transpose(Image.Transpose.ROTATE_90),  # 427x640, portrait
        "camera": Image.fromarray(skimage.data.camera()),  # 512x512 L (grayscale)
        "text": Image.fromarray(skimage.data.text()),  # 448x172 L, a document-like strip of text
        "logo": Image.fromarray(skimage.data.logo()),  # 500x500 RGBA
        "small": astronaut.crop((180, 20, 280, 120)),  # 100x100 RGB, smaller than one tile
    }


# ---------------------------------------------------------------------------------------------
# Videos, written with PyAV from the photos
# ---------------------------------------------------------------------------------------------


def write_video(path: Path, *, seconds: float, fps: int, width: int, height: int) -> Path:
    """An H.264 mp4 of `seconds * fps` distinct frames: scikit-image's coffee photo resized to `width` x
    `height`, rolled `frame_index` pixels to the right, with a white bar whose row is `frame_index % height`.
    `width` and `height` must be even (yuv420p)."""
    import av
    import skimage.data

    if width % 2 or height % 2:
        raise ValueError(f"H.264 yuv420p needs even dimensions, got {width}x{height}")
    base = np.asarray(Image.fromarray(skimage.data.coffee()).resize((width, height), Image.Resampling.BILINEAR))
    num_frames = int(round(seconds * fps))
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for index in range(num_frames):
            frame = np.roll(base, shift=index, axis=1).copy()  # (H, W, 3)
            frame[index % height, :, :] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def video_writer(tmp_path_factory):
    """A function writing a video (see `write_video`) into a fresh temporary directory: `video_writer(name, **kw)`."""
    directory = tmp_path_factory.mktemp("videos")

    def make(name: str, **kwargs) -> Path:
        return write_video(directory / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def short_video(video_writer) -> Path:
    """3 s at 10 fps, 64x48: 30 frames; at the processor's 1 fps this samples 3 frames."""
    return video_writer("short.mp4", seconds=3, fps=10, width=64, height=48)


@pytest.fixture(scope="session")
def long_video(video_writer) -> Path:
    """70 s at 2 fps, 32x24: 140 frames. Longer than 64 frames x 1 fps + 2 s, so frame sampling skips the first
    and last second (REFERENCE.md section 5) and caps at 64 frames."""
    return video_writer("long.mp4", seconds=70, fps=2, width=32, height=24)
