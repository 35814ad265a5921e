"""Videos: decode, choose frames, resize them to square tiles.

Reference: transformers' `SmolVLMVideoProcessor` (models/smolvlm/video_processing_smolvlm.py:
`sample_frames`, `resize`) and `read_video_decord` (video_utils.py) for the metadata.

Frame choice (REFERENCE.md section 5): n = max(1, min(round(fps * duration), max_frames)) indices
`unique(linspace(start, end, n, dtype=int))`; start/end skip `skip_secs` at both ends only when
duration - 2 * skip_secs > max_frames * fps. duration = total_frames / source_fps.

Resize: transformers resizes frames with torchvision, which calls
`torch.nn.functional.interpolate(uint8, mode="lanczos", antialias=True)` on CPU. That kernel is in
torch itself, so we call it directly: the frames are bit-identical to transformers' and torchvision
is not needed. (It differs from Pillow's LANCZOS by up to 2 grey levels, so images and frames must
not share one resize function.) Two resizes, as in transformers: first to the configured size
(longest edge, aspect kept, even short side), then to frame_size x frame_size.

Decoders: decord when importable (what transformers' decord backend uses), else PyAV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from smolvlm.processing.config import MAX_IMAGE_SIZE, VideoSettings
from smolvlm.processing.errors import ProcessorError, require_file

# PIL resample codes -> torch interpolate modes (transformers: pil_torch_interpolation_mapping)
TORCH_RESIZE_MODES = {1: "lanczos", 2: "bilinear", 3: "bicubic"}


@dataclass
class VideoProbe:
    """What a video's container says, and the frames that will be sampled: enough for the prompt
    (frame count, timestamps, duration) before any frame is decoded."""

    path: str
    backend: str  # "decord" or "pyav"
    frame_indices: list[int]  # index in the source of each frame to sample
    source_fps: float
    total_frames: int
    reader: object | None = None  # decord's open VideoReader, reused by `read_frames`

    @property
    def duration(self) -> float:
        return self.total_frames / self.source_fps if self.source_fps else 0.0

    @property
    def timestamps(self) -> list[float]:
        return [i / self.source_fps for i in self.frame_indices]


@dataclass
class VideoClip(VideoProbe):
    frames: np.ndarray | None = None  # (T, H, W, 3) uint8 RGB, the sampled frames only


def sample_frame_indices(
    total_frames: int, source_fps: float, fps: float, max_frames: int, skip_secs: float = 1.0
) -> list[int]:
    """`SmolVLMVideoProcessor.sample_frames`."""
    duration = total_frames / source_fps if source_fps else 0.0
    wanted = max(1, min(int(round(fps * duration)), max_frames))
    start, end = 0, total_frames - 1
    if skip_secs > 0 and (duration - 2 * skip_secs) > (max_frames * fps):
        start = int(skip_secs * source_fps)
        end = int(total_frames - skip_secs * source_fps)
    start, end = max(0, start), min(end, total_frames - 1)
    if start >= end:
        start, end = 0, total_frames - 1
    return [int(i) for i in np.unique(np.linspace(start, end, wanted, dtype=int))]


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def _decord_available() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def _probe_decord(path: str, settings: VideoSettings) -> VideoProbe:
    import decord

    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
    except Exception as e:  # decord raises DECORDError (a RuntimeError subclass) or bare errors
        raise ProcessorError(f"cannot read video {path}: {e}") from e
    total, source_fps = len(reader), float(reader.get_avg_fps())
    if total == 0 or not source_fps or not math.isfinite(source_fps):
        raise ProcessorError(f"video {path} has no frames (frames={total}, fps={source_fps})")
    indices = sample_frame_indices(total, source_fps, settings.fps, settings.max_frames, settings.skip_secs)
    return VideoProbe(path, "decord", indices, source_fps, total, reader)


def _read_decord(probe: VideoProbe) -> np.ndarray:
    try:
        return probe.reader.get_batch(probe.frame_indices).asnumpy()
    except Exception as e:
        raise ProcessorError(f"cannot decode frames {probe.frame_indices[:4]}... of video {probe.path}: {e}") from e


def _probe_pyav(path: str, settings: VideoSettings) -> VideoProbe:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ProcessorError(f"{path} has no video stream")
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate or 0)
            total = stream.frames or sum(1 for _ in container.demux(stream) if _.size)  # header count, else packets
    except ProcessorError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise ProcessorError(f"cannot read video {path}: {e}") from e
    if total == 0 or not source_fps or not math.isfinite(source_fps):
        raise ProcessorError(f"video {path} has no frames (frames={total}, fps={source_fps})")
    indices = sample_frame_indices(total, source_fps, settings.fps, settings.max_frames, settings.skip_secs)
    return VideoProbe(path, "pyav", indices, source_fps, total)


def _read_pyav(probe: VideoProbe) -> np.ndarray:
    import av

    indices, path = probe.frame_indices, probe.path
    wanted, frames = set(indices), {}
    try:
        with av.open(path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= indices[-1]:
                    break
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise ProcessorError(f"cannot read video {path}: {e}") from e
    missing = [i for i in indices if i not in frames]
    if missing:
        raise ProcessorError(f"video {path} ended before frames {missing[:4]} (header said {probe.total_frames} frames)")
    return np.stack([frames[i] for i in indices])


def probe_video(path: str | Path, settings: VideoSettings, backend: str = "auto", trusted: bool = True) -> VideoProbe:
    """Open a video and choose its frames, decoding none. backend: "decord", "pyav" or "auto"
    (decord if installed). With `trusted=False`, a missing and an unreadable file give the same error."""
    if settings.fps is None or settings.max_frames is None:
        raise ProcessorError("this checkpoint has no video_sampling.fps / max_frames; pass video_fps and video_max_frames")
    if not isinstance(path, (str, Path)):
        raise ProcessorError(f"a video must be given as a file path, got {type(path).__name__}")
    if backend == "auto":
        backend = "decord" if _decord_available() else "pyav"
    if backend not in ("decord", "pyav"):
        raise ProcessorError(f"unknown video backend {backend!r} (decord, pyav or auto)")
    try:
        path = require_file(path, "video")
        return (_probe_decord if backend == "decord" else _probe_pyav)(str(path), settings)
    except ProcessorError:
        if trusted:
            raise
        raise ProcessorError(f"cannot open video file {str(path)[:200]!r}") from None


def read_frames(probe: VideoProbe, trusted: bool = True) -> VideoClip:
    """Decode the frames a probe chose."""
    try:
        frames = (_read_decord if probe.backend == "decord" else _read_pyav)(probe)
    except ProcessorError:
        if trusted:
            raise
        raise ProcessorError(f"cannot open video file {probe.path[:200]!r}") from None
    return VideoClip(probe.path, probe.backend, probe.frame_indices, probe.source_fps, probe.total_frames, None, frames)


def load_video(path: str | Path, settings: VideoSettings, backend: str = "auto") -> VideoClip:
    """Decode the frames `settings` asks for (`probe_video`, then `read_frames`)."""
    return read_frames(probe_video(path, settings, backend))


# ---------------------------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------------------------


def first_resize_size(height: int, width: int, resize: tuple) -> tuple[int, int]:
    """video_processing_smolvlm.get_resize_output_image_size (longest edge, even short side)."""
    if resize[0] == "height_width":
        return resize[1], resize[2]
    longest = min(MAX_IMAGE_SIZE, resize[1])
    aspect_ratio = width / height
    if width >= height:
        width, height = longest, int(longest / aspect_ratio)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect_ratio)
        width += width % 2
    return max(height, 1), max(width, 1)


def _resize_frames(frames: torch.Tensor, height: int, width: int, resample: int) -> torch.Tensor:
    """(T, 3, h, w) uint8 -> (T, 3, height, width) uint8, torchvision's `resize_image` on CPU."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    mode = TORCH_RESIZE_MODES.get(resample)
    if mode is None:
        raise ProcessorError(f"video resample filter {resample} is not supported (1 LANCZOS, 2 BILINEAR, 3 BICUBIC)")
    try:
        return torch.nn.functional.interpolate(frames, (height, width), mode=mode, antialias=True, align_corners=False)
    except (NotImplementedError, ValueError, RuntimeError):
        # Older torch has no uint8 lanczos: Pillow's LANCZOS is within 2 grey levels of it.
        from PIL import Image

        resized = [
            np.asarray(Image.fromarray(f.permute(1, 2, 0).numpy()).resize((width, height), resample=resample))
            for f in frames
        ]
        return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()


def resize_frames(frames: np.ndarray, settings: VideoSettings) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, frame_size, frame_size) uint8."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W)
    height, width = first_resize_size(video.shape[2], video.shape[3], settings.resize)
    video = _resize_frames(video, height, width, settings.resample)
    return _resize_frames(video, settings.frame_size, settings.frame_size, settings.resample)


def duration_text(clip: VideoProbe) -> str:
    """H:MM:SS of the whole source video, as transformers prints it."""
    return str(timedelta(seconds=int(clip.duration)))


def timestamp_texts(clip: VideoProbe) -> list[str]:
    """MM:SS of each sampled frame."""
    return [f"{int(t // 60):02d}:{int(t % 60):02d}" for t in clip.timestamps]
