"""The inference engine: paged KV cache, continuous batching, prefix caching, sampling, streaming.

Read in this order: engine.py (the loop), request.py (what a request is, its admission checks),
scheduler.py and block_manager.py (bookkeeping, pure Python), runner.py (flat tensors, the model's
stages), attention.py and kv_cache.py (the paged cache), sampler.py, outputs.py (text, stop strings,
results), cuda_graphs.py (decode steps replayed on GPU). config.py holds the settings.
"""

from smolvlm.engine.config import EngineConfig
from smolvlm.engine.engine import Engine, EngineStats, Stream
from smolvlm.engine.outputs import GenerationResult, StepOutput
from smolvlm.engine.params import SamplingParams
from smolvlm.engine.request import ImageInput, PromptInputs, RequestError

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "GenerationResult",
    "ImageInput",
    "PromptInputs",
    "RequestError",
    "SamplingParams",
    "StepOutput",
    "Stream",
]
