"""Typed settings read from a checkpoint's processor files, and the rule for which file wins.

Files in a SmolVLM2 checkpoint directory that matter for preprocessing (REFERENCE.md section 2):

    preprocessor_config.json        image settings (+ video settings in `video_sampling`)
    video_preprocessor_config.json  video settings, when present (else preprocessor_config.json)
    processor_config.json           image_seq_len (the number of <image> tokens per tile)
    chat_template.json / .jinja     the chat template (see `find_chat_template` for precedence)
    config.json                     text_config.max_position_embeddings (the context length)
    tokenizer.json, tokenizer_config.json   read by tokenizer.py

Missing values that change the token count or the pixels (tile size, resize target, image_seq_len)
raise `ProcessorError` instead of falling back to transformers' class defaults, which belong to
SmolVLM v1 (364 px tiles, 169 tokens) and silently give wrong prompts for SmolVLM2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from smolvlm.processing.errors import ProcessorError

PIL_LANCZOS = 1  # PIL.Image.Resampling.LANCZOS; the value every SmolVLM checkpoint uses
MAX_IMAGE_SIZE = 4096  # transformers' MAX_IMAGE_SIZE: absolute cap on the resized longest edge


@dataclass(frozen=True)
class ImageSettings:
    """How one image becomes tiles. Matches `SmolVLMImageProcessorPil` (image_processing_pil_smolvlm.py)."""

    longest_edge: int  # `size.longest_edge`: first resize target (2048), aspect kept
    tile_size: int  # `max_image_size.longest_edge`: tile side (512)
    do_image_splitting: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = PIL_LANCZOS

    def __post_init__(self) -> None:
        if self.longest_edge < 1 or self.tile_size < 1:
            raise ProcessorError(
                f"image sizes must be positive, got longest_edge={self.longest_edge}, tile_size={self.tile_size}"
            )
        if self.resample not in range(6):
            raise ProcessorError(f"image resample must be a PIL filter code 0..5 (1 = LANCZOS), got {self.resample}")
        _check_normalization(self)


def _check_normalization(s) -> None:
    """rescale_factor, image_mean, image_std: finite (a NaN here makes every pixel NaN), std non-zero."""
    if len(s.image_mean) != 3 or len(s.image_std) != 3:
        raise ProcessorError(f"image_mean/image_std need 3 values, got {s.image_mean} / {s.image_std}")
    values = (s.rescale_factor, *s.image_mean, *s.image_std)
    if not all(math.isfinite(v) for v in values) or any(v == 0 for v in s.image_std):
        raise ProcessorError(
            f"rescale_factor, image_mean and image_std must be finite (std non-zero), got "
            f"{s.rescale_factor}, {s.image_mean}, {s.image_std}"
        )


@dataclass(frozen=True)
class VideoSettings:
    """How a video becomes frames. Matches `SmolVLMVideoProcessor` (video_processing_smolvlm.py)."""

    fps: float | None  # frames sampled per second of video (`video_sampling.fps`)
    max_frames: int | None  # cap on sampled frames (`video_sampling.max_frames`)
    resize: tuple[str, int] | tuple[str, int, int]  # ("longest_edge", n) or ("height_width", h, w): first resize
    frame_size: int  # `max_image_size.longest_edge`: every frame ends square at this size
    skip_secs: float = 1.0  # seconds skipped at both ends of long videos
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = PIL_LANCZOS

    def __post_init__(self) -> None:
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ProcessorError(f"video fps must be positive and finite, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ProcessorError(f"video max_frames must be at least 1, got {self.max_frames}")
        if self.frame_size < 1 or any(n < 1 for n in self.resize[1:]):
            raise ProcessorError(f"video sizes must be positive, got resize={self.resize}, frame_size={self.frame_size}")
        if not (math.isfinite(self.skip_secs) and self.skip_secs >= 0):
            raise ProcessorError(f"video skip_secs must be finite and >= 0, got {self.skip_secs}")
        if self.resample not in (1, 2, 3):
            raise ProcessorError(f"video resample must be 1 (LANCZOS), 2 (BILINEAR) or 3 (BICUBIC), got {self.resample}")
        _check_normalization(self)


@dataclass(frozen=True)
class SpecialTokens:
    """The placeholder strings the prompt expansion writes (transformers reads them off the tokenizer)."""

    image: str = "<image>"
    video: str = "<video>"
    fake_image: str = "<fake_token_around_image>"
    global_image: str = "<global-img>"
    end_of_utterance: str = "<end_of_utterance>"


@dataclass(frozen=True)
class ProcessorConfig:
    image: ImageSettings
    video: VideoSettings | None  # None when the checkpoint has no video settings
    image_seq_len: int  # <image> tokens per tile (64 for 512 px tiles, 16 patches² / 4²)
    chat_template: str
    context_length: int | None  # max prompt tokens (text_config.max_position_embeddings); None = unchecked
    tokens: SpecialTokens = SpecialTokens()

    def __post_init__(self) -> None:
        if self.image_seq_len < 1 or (self.context_length is not None and self.context_length < 1):
            raise ProcessorError(
                f"image_seq_len and the context length must be positive, got {self.image_seq_len}, {self.context_length}"
            )

    def with_overrides(
        self,
        do_image_splitting: bool | None = None,
        image_longest_edge: int | None = None,
        video_fps: float | None = None,
        video_max_frames: int | None = None,
    ) -> ProcessorConfig:
        """The per-call overrides users ask for; None keeps the checkpoint's value. Each is checked
        here (type, range, NaN), never clamped: a bad value raises naming the option."""
        _check_override("do_image_splitting", do_image_splitting, bool)
        _check_override("image_longest_edge", image_longest_edge, int)
        _check_override("video_fps", video_fps, float)
        _check_override("video_max_frames", video_max_frames, int)
        image = self.image
        if do_image_splitting is not None:
            image = replace(image, do_image_splitting=do_image_splitting)
        if image_longest_edge is not None:
            image = replace(image, longest_edge=image_longest_edge)
        video = self.video
        if video is not None and (video_fps is not None or video_max_frames is not None):
            video = replace(
                video,
                fps=video.fps if video_fps is None else video_fps,
                max_frames=video.max_frames if video_max_frames is None else video_max_frames,
            )
        return replace(self, image=image, video=video)


def _check_override(name: str, value: Any, kind: type) -> None:
    """None, or a value of `kind` (ints accepted as floats; bools are not numbers here), positive and finite."""
    if value is None:
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise ProcessorError(f"{name} must be True or False, got {value!r}")
        return
    numeric = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise ProcessorError(f"{name} must be {'a number' if kind is float else 'an int'}, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ProcessorError(f"{name} must be positive and finite, got {value!r}")
    high = {"video_fps": 1000.0, "video_max_frames": 10_000, "image_longest_edge": 1 << 16}.get(name, 1_000_000)
    if value > high:
        raise ProcessorError(f"{name} must be at most {high:g}, got {value!r}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ProcessorError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ProcessorError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def _longest_edge(cfg: dict[str, Any], key: str, path: Path) -> int:
    value = cfg.get(key)
    if not isinstance(value, dict) or "longest_edge" not in value:
        raise ProcessorError(f"{path}: `{key}` must be {{'longest_edge': N}}, got {value!r}")
    return _whole(value["longest_edge"], f"{path.name}: {key}.longest_edge")


def _common(cfg: dict[str, Any]) -> dict[str, Any]:
    """Settings shared by the image and video processors, with transformers' class defaults."""
    out: dict[str, Any] = {}
    for key in ("do_rescale", "do_normalize"):
        if key in cfg:
            out[key] = bool(cfg[key])
    if "rescale_factor" in cfg:
        out["rescale_factor"] = float(cfg["rescale_factor"])
    for key in ("image_mean", "image_std"):
        if key in cfg:
            value = cfg[key]
            out[key] = tuple(float(v) for v in (value if isinstance(value, list) else [value] * 3))
    if "resample" in cfg:
        out["resample"] = int(cfg["resample"])
    return out


def _check_supported(cfg: dict[str, Any], path: Path) -> None:
    # These switches exist in the file format but every SmolVLM checkpoint sets them true; supporting
    # the false branch would be dead code, so refuse it loudly instead of ignoring it.
    for key in ("do_resize", "do_pad", "do_convert_rgb"):
        if cfg.get(key, True) is not True:
            raise ProcessorError(f"{path}: {key}={cfg[key]!r} is not supported (only true)")


def image_settings_from(cfg: dict[str, Any], path: Path) -> ImageSettings:
    # transformers: SmolVLMImageProcessorPil.__init__ takes these keys from preprocessor_config.json
    _check_supported(cfg, path)
    return ImageSettings(
        longest_edge=_longest_edge(cfg, "size", path),
        tile_size=_longest_edge(cfg, "max_image_size", path),
        do_image_splitting=bool(cfg.get("do_image_splitting", True)),
        **_common(cfg),
    )


def video_settings_from(cfg: dict[str, Any], path: Path) -> VideoSettings | None:
    # transformers: SmolVLMVideoProcessor.__init__. Quirk reproduced on purpose: when the file has both
    # `size` and `video_sampling`, `size` replaces `video_sampling.video_size`, so frames of the 256M
    # checkpoint are first resized to longest edge 2048 (not 512), then squared to 512.
    sampling = cfg.get("video_sampling")
    if sampling is None:
        return None
    _check_supported(cfg, path)
    size = cfg["size"] if "size" in cfg else sampling.get("video_size")
    if not isinstance(size, dict):
        raise ProcessorError(f"{path}: no frame size (`size` or `video_sampling.video_size`), got {size!r}")
    if "longest_edge" in size:
        resize: tuple = ("longest_edge", int(size["longest_edge"]))
    elif "height" in size and "width" in size:
        resize = ("height_width", int(size["height"]), int(size["width"]))
    else:
        raise ProcessorError(f"{path}: video size must have longest_edge or height+width, got {size!r}")
    return VideoSettings(
        fps=None if sampling.get("fps") is None else float(sampling["fps"]),
        max_frames=None if sampling.get("max_frames") is None else int(sampling["max_frames"]),
        resize=resize,
        frame_size=_longest_edge(cfg, "max_image_size", path),
        **_common(cfg),
    )


def find_chat_template(directory: Path, processor_cfg: dict[str, Any]) -> str:
    """The template transformers' `ProcessorMixin.from_pretrained` would pick, in its order:
    `chat_template` inside processor_config.json, then chat_template.json (legacy), then
    chat_template.jinja. A SmolLM2 tokenizer saved next to the processor often leaves a text-only
    chat_template.jinja behind: the .json one must win, as it does in transformers."""
    if isinstance(processor_cfg.get("chat_template"), str):
        return processor_cfg["chat_template"]
    legacy = directory / "chat_template.json"
    if legacy.is_file():
        template = read_json(legacy).get("chat_template")
        if not isinstance(template, str):
            raise ProcessorError(f"{legacy} has no string `chat_template` key")
        return template
    raw = directory / "chat_template.jinja"
    if raw.is_file():
        return raw.read_text(encoding="utf-8")
    raise ProcessorError(
        f"no chat template in {directory} (looked for processor_config.json['chat_template'], "
        "chat_template.json, chat_template.jinja)"
    )


def load_processor_config(directory: Path, context_length: int | None = None) -> ProcessorConfig:
    """Read every processor file of a checkpoint directory. `context_length` overrides config.json.
    A value of the wrong type (a string where a number belongs, a list for an object) raises
    ProcessorError naming the directory, never a bare TypeError from deep inside."""
    try:
        return _load_processor_config(directory, context_length)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        if isinstance(e, ProcessorError):
            raise
        raise ProcessorError(f"{directory}: a processor config file holds a malformed value ({type(e).__name__}: {e})") from None


def _whole(value: Any, what: str) -> int:
    """An int from a config value; 64.7 or "64" are refused, not truncated."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ProcessorError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def _load_processor_config(directory: Path, context_length: int | None) -> ProcessorConfig:
    pre_path = directory / "preprocessor_config.json"
    if not pre_path.is_file():
        raise ProcessorError(f"{directory} has no preprocessor_config.json")
    pre = read_json(pre_path)
    image = image_settings_from(pre, pre_path)

    video_path = directory / "video_preprocessor_config.json"
    video = video_settings_from(read_json(video_path), video_path) if video_path.is_file() else None
    if video is None:
        video = video_settings_from(pre, pre_path)

    proc_path = directory / "processor_config.json"
    proc = read_json(proc_path) if proc_path.is_file() else {}
    if "image_seq_len" not in proc:
        raise ProcessorError(
            f"{proc_path} is missing or has no `image_seq_len`; refusing to guess the number of "
            "<image> tokens per tile (transformers' default of 169 is SmolVLM v1's)"
        )

    tokens = SpecialTokens()
    tok_path = directory / "tokenizer_config.json"
    if tok_path.is_file():
        # transformers' SmolVLMProcessor reads these names off the tokenizer (its extra_special_tokens)
        extra = read_json(tok_path).get("extra_special_tokens")
        if isinstance(extra, dict):
            names = {"image_token": "image", "video_token": "video", "fake_image_token": "fake_image",
                     "global_image_token": "global_image", "end_of_utterance_token": "end_of_utterance"}
            found = {field: extra[key] for key, field in names.items() if isinstance(extra.get(key), str)}
            tokens = replace(tokens, **found)

    if context_length is None:
        config_path = directory / "config.json"
        if config_path.is_file():
            text_config = read_json(config_path).get("text_config") or {}
            if text_config.get("max_position_embeddings") is not None:
                context_length = int(text_config["max_position_embeddings"])

    return ProcessorConfig(
        image=image,
        video=video,
        image_seq_len=_whole(proc["image_seq_len"], "processor_config.json: image_seq_len"),
        chat_template=find_chat_template(directory, proc),
        context_length=context_length,
        tokens=tokens,
    )
