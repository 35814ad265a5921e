"""The inference engine: paged KV cache, continuous batching, prefix caching, sampling, streaming.

Read in this order: engine.py (the loop), scheduler.py and block_manager.py (bookkeeping, pure
Python), runner.py (flat tensors, the model), attention.py and kv_cache.py (the paged cache),
sampler.py, detokenizer.py, cuda_graphs.py (decode steps replayed on GPU).
"""

from smolvlm.engine.engine import (
    Engine,
    EngineConfig,
    GenerationResult,
    ImageInput,
    PromptInputs,
    RequestError,
    StepOutput,
)
from smolvlm.engine.params import SamplingParams

__all__ = [
    "Engine",
    "EngineConfig",
    "GenerationResult",
    "ImageInput",
    "PromptInputs",
    "RequestError",
    "SamplingParams",
    "StepOutput",
]
