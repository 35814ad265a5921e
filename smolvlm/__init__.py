"""smolvlm: a small, readable SmolVLM2 (SigLIP vision tower + pixel-shuffle connector + Llama decoder).

Trace an image to logits: processing/ (pixels and prompt) -> vision.py -> connector.py -> model.py
(merge) -> text.py (decoder) -> model.py (lm_head). The engine (paged KV cache, batching) sits on top.
"""

from smolvlm.config import ConfigError, SmolVLMConfig, TextConfig, VisionConfig
from smolvlm.model import ImageTokenMismatchError, SmolVLM
from smolvlm.weights import CheckpointError

__all__ = [
    "SmolVLM",
    "SmolVLMConfig",
    "TextConfig",
    "VisionConfig",
    "ConfigError",
    "CheckpointError",
    "ImageTokenMismatchError",
]
