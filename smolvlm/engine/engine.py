"""The engine: conversations in, answers out (all at once or streamed), many requests batched.

    engine = Engine.from_pretrained("HuggingFaceTB/SmolVLM2-256M-Video-Instruct")
    results = engine.generate([conversation_a, conversation_b], SamplingParams(max_new_tokens=64))
    for piece in engine.stream(conversation, SamplingParams()): print(piece, end="")

Each step: the scheduler picks sequences and token counts (scheduler.py), the block manager gives
them KV-cache blocks, reusing cached prefixes (block_manager.py), the runner builds flat tensors and
runs the model over the paged cache (runner.py, attention.py), the sampler picks tokens
(sampler.py), and each request's detokenizer turns them into text (detokenizer.py).

A request that cannot run (unreadable image, prompt over the context, a pool too small for it)
finishes alone with `finish_reason="error"` and a message; the others in the same call complete.
Below the conversation level, `add_request` also takes `PromptInputs` (token ids + image tensors +
content hashes) directly.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from smolvlm.engine.attention import make_backend
from smolvlm.engine.block_manager import BlockManager
from smolvlm.engine.cuda_graphs import CudaGraphDecoder
from smolvlm.engine.detokenizer import IncrementalDetokenizer
from smolvlm.engine.kv_cache import KVCache
from smolvlm.engine.params import SamplingParams
from smolvlm.engine.runner import ImagePayload, ModelRunner, VisionFeatureCache
from smolvlm.engine.sampler import Sampler
from smolvlm.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from smolvlm.engine.sequence import ImageSpan, Sequence, SequenceStatus

Messages = list[dict[str, Any]]

GiB = 1 << 30


class RequestError(ValueError):
    """A request that cannot be served (bad input, too long, failed during generation)."""


@dataclass
class ImageInput:
    """One image (its tiles) or one video (its frames), as the model sees them."""

    pixel_values: torch.Tensor  # (n_tiles, 3, H, W) float, normalised
    content_hash: str  # identifies the pixels: equal hashes must mean equal tiles
    pixel_attention_mask: torch.Tensor | None = None  # (n_tiles, H, W) or None (every pixel real)


@dataclass
class PromptInputs:
    """A tokenised prompt: ids with `<image>` placeholders, and the images that fill them, in order."""

    input_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)


@dataclass
class GenerationResult:
    request_id: int
    text: str
    token_ids: list[int]  # generated tokens, the stop token included when there was one
    finish_reason: str  # "stop" (stop token or string), "length", "error", "abort"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (at the last admission)
    time_to_first_token: float | None = None  # seconds from add_request to the first sampled token
    total_time: float | None = None  # seconds from add_request to the end


@dataclass
class StepOutput:
    request_id: int
    text: str  # new text since the last step ('' when a token completes no character yet)
    result: GenerationResult | None = None  # set when the request finished this step


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # explicit pool size; else from kv_cache_memory
    kv_cache_memory: int | None = None  # bytes; default 1 GiB on CPU, half the free memory on CUDA
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    vision_cache_memory: int = 256 << 20  # bytes of image features kept for reuse
    attention_backend: str = "auto"
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (CUDA + triton backend only)
    # Decode steps on CPU: "c" = smolvlm_cpu_kernels.CpuKernels (C, compiled at first use: weight products,
    # RMSNorm, RoPE, KV store, decode attention), "torch" = plain PyTorch, "auto" = "c" when it builds,
    # else "torch" with a warning. Ignored on CUDA. The engine installs the choice on its model
    # (SmolVLM.set_kernels), so the model's own few-row calls use it too.
    cpu_kernels: str = "auto"


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0  # prompt (or recomputed) tokens run through the model
    decode_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens skipped thanks to the prefix cache
    preemptions: int = 0
    vision_calls: int = 0


class _Request:
    def __init__(self, seq: Sequence, detokenizer: IncrementalDetokenizer | None):
        self.seq = seq
        self.detokenizer = detokenizer
        self.emitted = 0  # characters of text already handed out
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.stop_at: int | None = None  # text length cut by a stop string


class Engine:
    def __init__(
        self,
        model,
        processor=None,
        config: EngineConfig = EngineConfig(),
        eos_token_ids: tuple[int, ...] = (),
    ):
        self.model = model
        self.processor = processor
        self.config = config
        text = model.config.text
        self.max_model_len = min(config.max_model_len or text.max_position_embeddings, text.max_position_embeddings)
        self.image_token_id = model.config.image_token_id
        self.image_seq_len = model.config.image_seq_len
        stop = set(eos_token_ids)
        if processor is not None:
            try:
                stop.add(processor.tokenizer.token_to_id("<end_of_utterance>"))
            except ValueError:  # ProcessorError: a tokenizer without it; eos from generation_config only
                pass
        self.stop_token_ids = frozenset(stop)

        device = model.device
        num_blocks = config.num_kv_blocks or self._blocks_from_budget(model, config)
        self.kv_cache = KVCache(text, num_blocks, config.block_size, model.dtype, device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len), self.block_manager
        )
        self.sampler = Sampler(device)
        self.cpu_kernels = _load_cpu_kernels(config.cpu_kernels, device)  # CpuKernels, or None: plain PyTorch
        model.set_kernels(self.cpu_kernels)
        self.backend = make_backend(config.attention_backend, device, self.cpu_kernels)
        graphs = None
        if config.cuda_graphs and device.type == "cuda" and self.backend.name == "triton":
            scale = text.head_dim**-0.5
            graphs = CudaGraphDecoder(model, self.kv_cache, self.backend, config.max_num_seqs, self.max_model_len, scale)
        self.runner = ModelRunner(
            model, self.kv_cache, self.backend, self.sampler, VisionFeatureCache(config.vision_cache_memory), graphs
        )
        self.requests: dict[int, _Request] = {}
        self.stats = EngineStats()
        self.last_result: GenerationResult | None = None  # of the last `stream` call
        self._next_id = 0

    def _blocks_from_budget(self, model, config: EngineConfig) -> int:
        budget = config.kv_cache_memory
        if budget is None:
            if model.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(model.device)
                budget = free // 2
            else:
                budget = 1 * GiB
        num_blocks = KVCache.num_blocks_for_budget(model.config.text, config.block_size, model.dtype, budget)
        useful = config.max_num_seqs * (self.max_model_len // config.block_size + 1)  # more is never used
        return max(1, min(num_blocks, useful))

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        attention_backend: str = "auto",
        **options: Any,
    ) -> "Engine":
        """Model, processor and generation config from a checkpoint directory or hub repo id.
        `options` are EngineConfig fields (block_size, kv_cache_memory, max_num_seqs, ...)."""
        from smolvlm.model import SmolVLM
        from smolvlm.processing import Processor
        from smolvlm.weights import CHECKPOINT_PATTERNS, resolve_checkpoint

        directory = resolve_checkpoint(path_or_repo_id, allow_patterns=CHECKPOINT_PATTERNS)
        model = SmolVLM.from_pretrained(directory, dtype=dtype, device=device)
        processor = Processor.from_pretrained(directory if Path(path_or_repo_id).expanduser().is_dir() else path_or_repo_id)
        eos: tuple[int, ...] = ()
        generation_config = directory / "generation_config.json"
        if generation_config.is_file():
            value = json.loads(generation_config.read_text()).get("eos_token_id")
            eos = tuple(value) if isinstance(value, list) else (() if value is None else (int(value),))
        config = EngineConfig(attention_backend=attention_backend, **options)
        return cls(model, processor, config, eos_token_ids=eos)

    # ------------------------------------------------------------------ requests

    def prepare(self, conversation: Messages, **processor_options: Any) -> PromptInputs:
        """Conversation -> PromptInputs through the processor (raises its ProcessorError on bad input)."""
        if self.processor is None:
            raise RequestError("this engine has no processor: pass PromptInputs (token ids and image tensors)")
        item = self.processor.prepare(conversation, **processor_options)
        images = []
        if item.media:
            pixels = torch.as_tensor(item.pixel_values)  # (N, 3, H, W): every item's tiles, in order
            offset = 0
            for media in item.media:
                images.append(ImageInput(pixels[offset : offset + media.num_tiles], media.sha256))
                offset += media.num_tiles
        return PromptInputs(list(item.input_ids), images)

    def add_request(
        self, prompt: PromptInputs | Messages, params: SamplingParams = SamplingParams(), **processor_options: Any
    ) -> int:
        """Queue one request; returns its id. Raises (RequestError / ProcessorError) if it cannot be served."""
        if not isinstance(prompt, PromptInputs):
            prompt = self.prepare(prompt, **processor_options)
        request_id = self._next_id
        self._next_id += 1
        seq = Sequence(
            request_id,
            prompt.input_ids,
            params,
            self.config.block_size,
            images=self._image_spans(prompt, request_id),
            stop_token_ids=self.stop_token_ids | frozenset(params.stop_token_ids),
        )
        try:
            self.scheduler.add(seq)
        except ValueError as e:
            raise RequestError(str(e)) from None
        detokenizer = None
        if self.processor is not None:
            skip = params.skip_special_tokens
            detokenizer = IncrementalDetokenizer(lambda ids: self.processor.decode(ids, skip_special_tokens=skip))
        self.requests[request_id] = _Request(seq, detokenizer)
        self.sampler.add(request_id, params)
        return request_id

    def _image_spans(self, prompt: PromptInputs, request_id: int) -> list[ImageSpan]:
        vocab = self.model.config.text.vocab_size
        ids = prompt.input_ids
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"request {request_id}: token ids must be in [0, {vocab})")
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        needed = 0
        for image in prompt.images:
            if image.pixel_values.dim() != 4:
                raise RequestError(
                    f"request {request_id}: an image's pixel_values should be (n_tiles, 3, H, W), got {tuple(image.pixel_values.shape)}"
                )
            needed += image.pixel_values.shape[0] * self.image_seq_len
        if needed != len(positions):
            raise RequestError(
                f"request {request_id}: the prompt has {len(positions)} <image> tokens but its "
                f"{len(prompt.images)} images need {needed} ({self.image_seq_len} per tile)"
            )
        spans, offset = [], 0
        for image in prompt.images:
            n = image.pixel_values.shape[0] * self.image_seq_len
            own = positions[offset : offset + n]
            offset += n
            payload = ImagePayload(image.pixel_values, image.pixel_attention_mask, own)
            spans.append(ImageSpan(own[0], own[-1] + 1, image.content_hash, payload))
        return spans

    def abort(self, request_id: int) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request.seq, "abort")
            self.sampler.remove(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ one step

    def step(self) -> list[StepOutput]:
        """Run one model step; return the new text (and results) of the requests it advanced."""
        outputs: list[StepOutput] = []
        batch = self.scheduler.schedule()
        self.stats.preemptions = self.scheduler.num_preemptions
        for seq in batch.failed:
            outputs.append(self._finalize(seq))
        if not batch.seqs:
            return outputs

        # Image features for the image tokens in this step; a failing image fails only its request.
        images, keep = [], []
        for i, seq in enumerate(batch.seqs):
            start = seq.num_computed_tokens
            try:
                images.append(self.runner.image_inputs(seq, start, start + batch.num_new_tokens[i]))
                keep.append(i)
            except Exception as e:  # noqa: BLE001 - reported on the request, the batch goes on
                self.scheduler.finish(seq, "error", f"request {seq.seq_id}: image features failed: {type(e).__name__}: {e}")
                outputs.append(self._finalize(seq))
        if len(keep) != len(batch.seqs):
            batch = _subset(batch, keep)
            if not batch.seqs:
                return outputs

        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens < seq.num_prompt_tokens or n > 1:
                self.stats.prefill_tokens += n
            else:
                self.stats.decode_tokens += n
            if seq.num_computed_tokens == seq.num_cached_tokens and seq.num_cached_tokens:
                self.stats.cached_prompt_tokens += seq.num_cached_tokens
        sampled = self.runner.execute(batch, images)
        self.stats.steps += 1
        self.stats.vision_calls = self.runner.num_vision_calls
        self.scheduler.postprocess(batch, sampled)

        for seq, token in zip(batch.seqs, sampled):
            if token is None:
                continue
            request = self.requests[seq.seq_id]
            if request.first_token_at is None:
                request.first_token_at = time.perf_counter()
            text = self._on_token(request, token)
            if seq.is_finished:
                outputs.append(self._finalize(seq))
            elif text:
                outputs.append(StepOutput(seq.seq_id, text))
        return outputs

    def _on_token(self, request: _Request, token: int) -> str:
        """Detokenise the new token, apply stop strings; return the text that may be shown now."""
        if request.detokenizer is None:
            return ""
        seq = request.seq
        piece = request.detokenizer.add(token)
        stops = seq.params.stop
        text = request.detokenizer.text
        if stops and piece:
            longest = max(len(s) for s in stops)
            search_from = max(0, len(text) - len(piece) - longest + 1)
            found = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
            if found:
                request.stop_at = min(found)
                self.scheduler.finish(seq, "stop")
        if seq.is_finished:
            return ""  # _finalize hands out the rest
        # With stop strings, hold back what could still turn out to be the start of one.
        visible = len(text) - (max(len(s) for s in stops) - 1 if stops else 0)
        if visible <= request.emitted:
            return ""
        out = text[request.emitted : visible]
        request.emitted = visible
        return out

    def _finalize(self, seq: Sequence) -> StepOutput:
        request = self.requests.pop(seq.seq_id, None)
        self.sampler.remove(seq.seq_id)
        text = ""
        if request is not None and request.detokenizer is not None:
            if request.stop_at is not None:
                text = request.detokenizer.text[: request.stop_at]
            else:
                request.detokenizer.finish()
                text = request.detokenizer.text
        emitted = request.emitted if request is not None else 0
        result = GenerationResult(
            request_id=seq.seq_id,
            text=text,
            token_ids=seq.generated_token_ids,
            finish_reason=seq.finish_reason or "error",
            error=seq.error,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            time_to_first_token=None if request is None or request.first_token_at is None
            else request.first_token_at - request.arrival,
            total_time=None if request is None else time.perf_counter() - request.arrival,
        )
        return StepOutput(seq.seq_id, text[emitted:], result)

    # ------------------------------------------------------------------ high level

    def generate(
        self,
        conversations: list[Messages | PromptInputs] | Messages,
        params: SamplingParams | list[SamplingParams] = SamplingParams(),
        **processor_options: Any,
    ) -> list[GenerationResult]:
        """Run every conversation to completion, batched; results in input order.

        A conversation that fails (bad image, too long...) gets a result with finish_reason "error"
        and the message in `.error`; the others are not affected."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # one conversation given as a list of messages
        if isinstance(params, SamplingParams):
            params = [params] * len(conversations)
        if len(params) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(params)} SamplingParams")
        results: list[GenerationResult | None] = [None] * len(conversations)
        ids: dict[int, int] = {}
        for index, (conversation, p) in enumerate(zip(conversations, params)):
            try:
                ids[self.add_request(conversation, p, **processor_options)] = index
            except (ValueError, OSError) as e:  # ProcessorError and RequestError are ValueErrors
                results[index] = GenerationResult(-1, "", [], "error", error=f"conversation {index}: {e}")
        while any(r in self.requests for r in ids):
            for out in self.step():
                if out.result is not None and out.request_id in ids:
                    results[ids[out.request_id]] = out.result
        return results  # type: ignore[return-value]

    def stream(
        self, conversation: Messages | PromptInputs, params: SamplingParams = SamplingParams(), **processor_options: Any
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece; raises RequestError if the request fails.
        Afterwards `engine.last_result` holds its GenerationResult (token ids, finish reason, counts)."""
        request_id = self.add_request(conversation, params, **processor_options)
        try:
            while request_id in self.requests:
                for out in self.step():
                    if out.request_id != request_id:
                        continue
                    if out.text:
                        yield out.text
                    if out.result is not None:
                        self.last_result = out.result
                        if out.result.finish_reason == "error":
                            raise RequestError(out.result.error or "generation failed")
        finally:
            self.abort(request_id)  # closed early: give the blocks back


def _load_cpu_kernels(choice: str, device: torch.device):
    """The C decode kernels per `choice` (EngineConfig.cpu_kernels), or None for plain PyTorch."""
    if choice not in ("auto", "c", "torch"):
        raise ValueError(f"cpu_kernels must be 'auto', 'c' or 'torch', got {choice!r}")
    if device.type != "cpu" or choice == "torch":
        return None
    from smolvlm_cpu_kernels import CpuKernels, CpuKernelsUnavailable

    try:
        return CpuKernels.load()
    except CpuKernelsUnavailable as e:
        if choice == "c":
            raise
        warnings.warn(f"cpu_kernels='auto': decode steps run in plain PyTorch (slower): {e}", stacklevel=3)
        return None


def _subset(batch: ScheduledBatch, keep: list[int]) -> ScheduledBatch:
    seqs = [batch.seqs[i] for i in keep]
    num_new = [batch.num_new_tokens[i] for i in keep]
    return ScheduledBatch(seqs, num_new, sum(1 for n in num_new if n == 1), batch.preempted, batch.failed)


__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "GenerationResult",
    "ImageInput",
    "PromptInputs",
    "RequestError",
    "SamplingParams",
    "SequenceStatus",
    "StepOutput",
]
