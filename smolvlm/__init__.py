"""smolvlm: a small, readable SmolVLM2 (SigLIP vision tower + pixel-shuffle connector + Llama decoder).

Trace an image to logits: processing/ (pixels and prompt) -> vision.py -> connector.py -> model.py
(merge) -> text.py (decoder) -> model.py (lm_head). The engine (engine/: paged KV cache, batching,
prefix caching, sampling) sits on top; cli.py is the `smolvlm` command.
"""

from smolvlm.config import ConfigError, SmolVLMConfig, TextConfig, VisionConfig
from smolvlm.engine import Engine, GenerationResult, RequestError, SamplingParams
from smolvlm.model import ImageTokenMismatchError, SmolVLM
from smolvlm.processing import Processor, ProcessorError
from smolvlm.weights import CheckpointError

__all__ = [
    "SmolVLM",
    "Processor",
    "Engine",
    "SamplingParams",
    "GenerationResult",
    "SmolVLMConfig",
    "TextConfig",
    "VisionConfig",
    "ConfigError",
    "CheckpointError",
    "ImageTokenMismatchError",
    "ProcessorError",
    "RequestError",
]
