"""Typed configuration, built from a checkpoint's `config.json`.

Mirrors `SmolVLMConfig` / `SmolVLMVisionConfig` (transformers/models/smolvlm/configuration_smolvlm.py)
and `LlamaConfig` (models/llama/configuration_llama.py), keeping only what the forward pass needs.

Defaults policy. A field that is missing from config.json gets a default only when that default is
what transformers itself would use *and* it cannot silently give a different function:
- shape fields with a default (vision `num_hidden_layers`, `intermediate_size`) are cross-checked by
  the strict weight loader against the tensors, so a wrong default fails at load time;
- fields whose transformers default is known to be wrong for this model family (vision
  `hidden_size` 1152, `patch_size` 32, `image_size` 224, heads 16; top-level `image_token_id`,
  `scale_factor`) have no default here: missing, they raise `ConfigError`.
The published SmolVLM2-256M/500M configs omit vision `num_hidden_layers` and `intermediate_size`,
relying on the SigLIP-base values 12 and 3072: that is why those two keep their defaults.
"""

from __future__ import annotations

import math

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """config.json is missing a required field, has a wrong type, or is inconsistent."""


_MISSING = object()


def _get(section: dict, key: str, kind: type, where: str, default: Any = _MISSING) -> Any:
    """Read `section[key]` as `kind`, or the default; raise ConfigError naming the field."""
    if key not in section or section[key] is None:
        if default is _MISSING:
            raise ConfigError(f"config.json: required field {where}.{key} is missing")
        return default
    value = section[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"config.json: field {where}.{key} should be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    if kind is float and not math.isfinite(value):  # json reads NaN and Infinity
        raise ConfigError(f"config.json: field {where}.{key} must be a finite number, got {value!r}")
    return value


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (transformers: SmolVLMVisionConfig)."""

    hidden_size: int
    num_attention_heads: int
    patch_size: int
    image_size: int
    num_hidden_layers: int = 12
    intermediate_size: int = 3072
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_attention_heads", "patch_size", "image_size",
                     "num_hidden_layers", "intermediate_size", "num_channels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: vision_config.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config.json: vision_config.hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size < self.patch_size:
            raise ConfigError(
                f"config.json: vision_config.image_size {self.image_size} is smaller than patch_size {self.patch_size}"
            )
        if not (math.isfinite(self.layer_norm_eps) and self.layer_norm_eps > 0):
            raise ConfigError(f"config.json: vision_config.layer_norm_eps must be a positive finite number, got {self.layer_norm_eps!r}")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"config.json: vision_config.hidden_act {self.hidden_act!r} is not supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        # The conv drops a remainder: the 2.2B model's 384 px / 14 px patches give a 27x27 grid.
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        w = "vision_config"
        return cls(
            hidden_size=_get(d, "hidden_size", int, w),
            num_attention_heads=_get(d, "num_attention_heads", int, w),
            patch_size=_get(d, "patch_size", int, w),
            image_size=_get(d, "image_size", int, w),
            num_hidden_layers=_get(d, "num_hidden_layers", int, w, 12),
            intermediate_size=_get(d, "intermediate_size", int, w, 3072),
            num_channels=_get(d, "num_channels", int, w, 3),
            layer_norm_eps=_get(d, "layer_norm_eps", float, w, 1e-6),
            hidden_act=_get(d, "hidden_act", str, w, "gelu_pytorch_tanh"),
        )


@dataclass(frozen=True)
class TextConfig:
    """Llama-style decoder (transformers: LlamaConfig as used by SmolVLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: text_config.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: text_config.num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config.json: text_config.head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"config.json: text_config.hidden_act {self.hidden_act!r} is not supported (only silu)")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"config.json: text_config.{name} must be a positive finite number, got {value!r}")

    @property
    def softmax_scale(self) -> float:
        """Attention scores are q.k * head_dim^-0.5 (LlamaAttention.scaling)."""
        return self.head_dim**-0.5

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        w = "text_config"
        heads = _get(d, "num_attention_heads", int, w)
        hidden = _get(d, "hidden_size", int, w)
        # RoPE: transformers 5 writes `rope_parameters`; older files have `rope_theta` / `rope_scaling`.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"config.json: text_config.rope_parameters should be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"config.json: text_config rope_type {rope_type!r} is not supported (only 'default')")
        if "rope_theta" in rope:
            rope_theta = _get(rope, "rope_theta", float, f"{w}.rope_parameters")
        else:
            rope_theta = _get(d, "rope_theta", float, w, 10000.0)
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ConfigError("config.json: text_config attention_bias / mlp_bias are not supported")
        return cls(
            vocab_size=_get(d, "vocab_size", int, w),
            hidden_size=hidden,
            intermediate_size=_get(d, "intermediate_size", int, w),
            num_hidden_layers=_get(d, "num_hidden_layers", int, w),
            num_attention_heads=heads,
            # Llama's rule: no num_key_value_heads means plain multi-head attention.
            num_key_value_heads=_get(d, "num_key_value_heads", int, w, heads),
            head_dim=_get(d, "head_dim", int, w, hidden // heads if heads else 0),
            max_position_embeddings=_get(d, "max_position_embeddings", int, w),
            # SmolVLMConfig builds its text config with rms_norm_eps 1e-5 unless config.json says otherwise.
            rms_norm_eps=_get(d, "rms_norm_eps", float, w, 1e-5),
            rope_theta=rope_theta,
            hidden_act=_get(d, "hidden_act", str, w, "silu"),
        )


@dataclass(frozen=True)
class SmolVLMConfig:
    """The whole model: vision tower + pixel-shuffle connector + decoder."""

    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    scale_factor: int
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        side = self.vision.patches_per_side
        if self.scale_factor <= 0 or side % self.scale_factor:
            raise ConfigError(
                f"config.json: scale_factor {self.scale_factor} must divide the patch grid side {side} "
                f"(image_size {self.vision.image_size} / patch_size {self.vision.patch_size})"
            )
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(
                f"config.json: image_token_id {self.image_token_id} is outside the vocabulary (size {self.text.vocab_size})"
            )

    @property
    def image_seq_len(self) -> int:
        """Decoder tokens per image tile after pixel shuffle (64 for the 256M model)."""
        return self.vision.num_patches // self.scale_factor**2

    @property
    def connector_input_size(self) -> int:
        return self.vision.hidden_size * self.scale_factor**2

    @classmethod
    def from_dict(cls, d: dict) -> "SmolVLMConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config.json: top level should be an object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in ("smolvlm", "idefics3"):
            raise ConfigError(f"config.json: model_type {model_type!r} is not a SmolVLM checkpoint (expected 'smolvlm')")
        for section in ("vision_config", "text_config"):
            if not isinstance(d.get(section), dict):
                raise ConfigError(f"config.json: required object {section} is missing")
        text_tie = d["text_config"].get("tie_word_embeddings")
        return cls(
            vision=VisionConfig.from_dict(d["vision_config"]),
            text=TextConfig.from_dict(d["text_config"]),
            image_token_id=_get(d, "image_token_id", int, "config"),
            scale_factor=_get(d, "scale_factor", int, "config"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", text_tie if text_tie is not None else False)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "SmolVLMConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config.json not found at {path}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: should hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError) as e:  # a section of the wrong type, a string for a number
            raise ConfigError(f"{path}: a malformed value ({type(e).__name__}: {e})") from None

