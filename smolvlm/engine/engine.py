"""The engine: conversations in, answers out (all at once or streamed), many requests batched.

    engine = Engine.from_pretrained("HuggingFaceTB/SmolVLM2-256M-Video-Instruct")
    results = engine.generate([conversation_a, conversation_b], SamplingParams(max_new_tokens=64))
    stream = engine.stream(conversation, SamplingParams())
    for piece in stream: print(piece, end="")
    stream.result                       # its GenerationResult: token ids, finish reason, counts

Each step: the scheduler picks sequences and token counts (scheduler.py), the block manager gives
them KV-cache blocks, reusing cached prefixes (block_manager.py), the runner builds flat tensors and
runs the model over the paged cache (runner.py, attention.py), the sampler picks tokens
(sampler.py), and each request's TextOutput turns them into text (outputs.py). What a request is
made of, and its admission checks, are in request.py; the settings in config.py.

The engine never changes the model it is given: its choice of few-row kernels (`ops`) and attention
backend are arguments of each call it makes, so several engines can share one model, and a plain
`model(...)` call is unaffected by any of them.

A request that cannot run (unreadable image, prompt over the context, a pool too small for it,
non-finite logits, a failed step) finishes alone with `finish_reason="error"` and a message; the
others in the same call complete. Every request has one consumer of its outputs (a `generate` call,
a `Stream`, or the callers of `step()` for `add_request`); outputs stepped for another wait in a
mailbox, so none is lost. One thread at a time (`_exclusive`). Conversations are prepared (media
read, decoded, checked) before the engine is entered; `generate` does it in a few threads beside its
model steps. A model hooked by `smolvlm.research` is refused (`_check_model`).
Below the conversation level, `add_request` also takes `PromptInputs` (token ids + image tensors +
content hashes, request.py) directly.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections import defaultdict, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from smolvlm.engine.attention import make_backend
from smolvlm.engine.block_manager import BlockManager
from smolvlm.engine.config import EngineConfig
from smolvlm.engine.cuda_graphs import CudaGraphDecoder
from smolvlm.engine.kv_cache import KVCache
from smolvlm.engine.outputs import GenerationResult, StepOutput, TextOutput
from smolvlm.engine.params import SamplingParams
from smolvlm.engine.request import Messages, PromptInputs, RequestError, image_spans, prompt_from_conversation
from smolvlm.engine.runner import ModelRunner, VisionFeatureCache
from smolvlm.engine.sampler import Sampler
from smolvlm.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from smolvlm.engine.sequence import Sequence
from smolvlm.ops import TORCH_OPS, KernelOps, Ops

GiB = 1 << 30
MEDIA_THREADS = 4  # conversations whose media `generate` reads and decodes at once
# The keyword options `add_request`, `stream` and `generate` pass on to `Processor.prepare`.
PROCESSOR_OPTIONS = frozenset(
    {"add_generation_prompt", "do_image_splitting", "image_longest_edge", "video_fps", "video_max_frames",
     "max_prompt_tokens", "trusted"}
)


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0  # prompt (or recomputed) tokens run through the model
    decode_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens skipped thanks to the prefix cache
    preemptions: int = 0
    vision_calls: int = 0


class _Request:
    def __init__(self, seq: Sequence, output: TextOutput | None):
        self.seq = seq
        self.output = output  # None without a processor (token ids only)
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.logprobs = [] if seq.params.logprobs is not None else None  # TokenLogprob per generated token
        self.logprobs_sent = 0  # how many of them outputs have carried

    def new_logprobs(self) -> list:
        """The log-probabilities no output has carried yet."""
        if not self.logprobs:
            return []
        new = self.logprobs[self.logprobs_sent :]
        self.logprobs_sent = len(self.logprobs)
        return new


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
        stop = set(eos_token_ids)
        if processor is not None:
            try:
                stop.add(processor.tokenizer.token_to_id(processor.config.tokens.end_of_utterance))
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
        # The few-row operations of every model call this engine makes (smolvlm/ops.py).
        self.ops: Ops = TORCH_OPS if self.cpu_kernels is None else KernelOps(self.cpu_kernels)
        self.backend = make_backend(config.attention_backend, device, self.cpu_kernels, model.dtype)
        graphs = None
        if config.cuda_graphs and device.type == "cuda" and self.backend.name == "triton":
            graphs = CudaGraphDecoder(model, self.kv_cache, self.backend, config.max_num_seqs, self.max_model_len, self.ops)
        self.runner = ModelRunner(
            model, self.kv_cache, self.backend, self.sampler, VisionFeatureCache(config.vision_cache_memory),
            self.ops, graphs,
            vision_tiles_per_pass=config.vision_tiles_per_pass or (1 if model.device.type == "cpu" else None),
        )
        self.requests: dict[int, _Request] = {}
        self.stats = EngineStats()
        self._next_id = 0
        # Every output goes to its request's consumer: `generate`, a `Stream`, or (requests added with
        # `add_request`) whoever calls `step()`. Outputs stepped for one consumer wait here for theirs.
        self._mailbox: defaultdict[int, list[StepOutput]] = defaultdict(list)
        self._owner: dict[int, object] = {}  # request id -> its consumer; absent = step() callers
        self._lock = threading.RLock()  # one thread at a time (see `_exclusive`)
        self._depth = 0  # how deep the holding thread is inside `_exclusive`
        self._dropped: deque[int] = deque()  # requests of streams dropped while the engine was busy
        self._model_fingerprint = model.fingerprint()  # what the cached KV and image features were computed with

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
        adapter: str | Path | None = None,
        quantize: str | None = None,
        **options: Any,
    ) -> "Engine":
        """Model, processor and generation config from a checkpoint directory or hub repo id.
        `adapter`: a LoRA adapter directory (PEFT format), merged into the weights at load: the
        engine then runs a plain model, so every fast path (fused projections, C decode kernels,
        CUDA graphs, prefix caching) works and a step costs what it did without the adapter.
        (Applying it per step instead would only pay off when one engine serves several adapters.)
        `quantize="int8"`: int8 decoder and LM head weights (SmolVLM.from_pretrained), after the
        adapter is merged. `options` are EngineConfig fields (block_size, kv_cache_memory, max_num_seqs, ...)."""
        from smolvlm.model import SmolVLM
        from smolvlm.processing import Processor
        from smolvlm.weights import CHECKPOINT_PATTERNS, resolve_checkpoint

        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")

        directory = resolve_checkpoint(path_or_repo_id, allow_patterns=CHECKPOINT_PATTERNS)
        model = SmolVLM.from_pretrained(directory, dtype=dtype, device=device,
                                        quantize=None if adapter is not None else quantize)
        if adapter is not None:
            from smolvlm.train.lora import load_adapter, merge_lora

            load_adapter(model, adapter, dtype=torch.float32)  # fp32 A and B: rounded once, after merging
            merge_lora(model)
            if quantize is not None:
                from smolvlm.quant import quantize_decoder

                quantize_decoder(model)
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
        """Conversation -> PromptInputs through the processor (raises its ProcessorError on bad input).
        The prompt must leave room for one answer token: a longer one fails from its media's sizes,
        before any pixel is decoded. Touches no engine state: any thread may call it."""
        limit = self.max_model_len - 1
        asked = processor_options.get("max_prompt_tokens")
        processor_options["max_prompt_tokens"] = limit if asked is None else min(asked, limit)
        return prompt_from_conversation(self.processor, conversation, **processor_options)

    def _prompt(self, prompt: PromptInputs | Messages, **processor_options: Any) -> PromptInputs:
        return prompt if isinstance(prompt, PromptInputs) else self.prepare(prompt, **processor_options)

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The engine is used by one thread at a time: a call from a second thread while another is
        inside the engine raises at once, naming the rule, and leaves the engine as it was."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "this Engine is being used by another thread: an Engine serves one thread at a time "
                "(run one loop thread that owns it and hand requests to it, or give each thread its own Engine)"
            )
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            self._lock.release()

    def add_request(
        self, prompt: PromptInputs | Messages, params: SamplingParams = SamplingParams(), **processor_options: Any
    ) -> int:
        """Queue one request; returns its id. Raises (RequestError / ProcessorError) if it cannot be served.
        Its outputs come from `step()`. Media are read and decoded before the engine is entered."""
        _check_params(params)
        self._check_model()
        prompt = self._prompt(prompt, **self._options(processor_options))
        with self._exclusive():
            return self._add(prompt, params, None)

    def _check_model(self) -> None:
        """Refuse a model hooked by smolvlm.research (`model.hooks`, `run_with_cache`) or with hooks on
        attention probabilities: the engine's steps are flat, batched and paged, which those hooks'
        values do not describe (and paged attention has no probabilities to show). Plain PyTorch
        hooks and wrapped modules elsewhere are honoured (README: the ops seam)."""
        if not any(m._forward_hooks for m in self.model.modules()):
            return
        from smolvlm.hookpoint import HookPoint, is_hooked
        from smolvlm.research.hooks import is_research_hook

        refused = [
            name for name, m in self.model.named_modules()
            if any(is_research_hook(h) for h in m._forward_hooks.values())
            or (isinstance(m, HookPoint) and name.endswith(".weights") and is_hooked(m))
        ]
        if refused:
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            raise RequestError(
                f"the model has research hooks on {refused[0]}{more}: the Engine's flat, batched, paged steps "
                "would not give them the values they expect. Generate with hooks through "
                "smolvlm.research.generate (one conversation, plain forward passes), or outside the hooks block"
            )

    def _options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Processor options checked once, at the door: unknown names and bad values raise here."""
        unknown = set(options) - PROCESSOR_OPTIONS
        if unknown:
            raise TypeError(f"unknown processor option(s) {sorted(unknown)}; known: {sorted(PROCESSOR_OPTIONS)}")
        if self.processor is not None:
            overrides = {k: options[k] for k in ("do_image_splitting", "image_longest_edge", "video_fps", "video_max_frames") if k in options}
            self.processor.config.with_overrides(**overrides)  # raises ProcessorError naming the option
        limit = options.get("max_prompt_tokens")
        if limit is not None and (type(limit) is not int or limit < 1):
            raise TypeError(f"max_prompt_tokens must be a positive int, got {limit!r}")
        for flag in ("add_generation_prompt", "trusted"):
            if flag in options and not isinstance(options[flag], bool):
                raise TypeError(f"{flag} must be True or False, got {options[flag]!r}")
        return options

    def _add(self, prompt: PromptInputs, params: SamplingParams, owner: object | None) -> int:
        _check_params(params)
        self._drop_stale_caches()
        request_id = self._next_id
        self._next_id += 1
        model_config = self.model.config
        spans = image_spans(
            prompt, request_id, model_config.text.vocab_size, model_config.image_token_id, model_config.image_seq_len,
            model_config.vision.image_size,
        )
        seq = Sequence(
            request_id,
            prompt.input_ids,
            params,
            self.config.block_size,
            images=spans,
            stop_token_ids=self.stop_token_ids | frozenset(params.stop_token_ids),
        )
        try:
            self.scheduler.add(seq)
        except ValueError as e:
            raise RequestError(str(e)) from None
        output = None
        if self.processor is not None:
            skip = params.skip_special_tokens
            output = TextOutput(lambda ids: self.processor.decode(ids, skip_special_tokens=skip), params.stop)
        self.requests[request_id] = _Request(seq, output)
        self.sampler.add(request_id, params)
        if owner is not None:
            self._owner[request_id] = owner
        return request_id

    def _drop_stale_caches(self) -> None:
        """Forget cached prefixes and image features when the model changed since they were computed
        (a weight edited, a module replaced or hooked): a new request then computes them afresh."""
        fingerprint = self.model.fingerprint()
        if fingerprint != self._model_fingerprint:
            self.block_manager.reset_prefix_cache()
            self.runner.vision_cache.clear()
            self._model_fingerprint = fingerprint

    def abort(self, request_id: int) -> None:
        """Stop a request now (if it is still running) and free its KV blocks; its pending outputs are dropped."""
        with self._exclusive():
            self._abort(request_id)

    def _abort(self, request_id: int) -> None:
        if type(request_id) is not int:
            raise TypeError(f"request_id must be an int (from add_request), got {request_id!r}")
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request.seq, "abort")
            self.sampler.remove(request_id)
        self._mailbox.pop(request_id, None)
        self._owner.pop(request_id, None)

    def _drop(self, request_id: int) -> None:
        """A consumer went away (a Stream garbage-collected): abort its request now if no thread is
        inside the engine, else at the start of the next call (never block, never raise: this runs
        from `__del__`, in whatever thread the garbage collector picked)."""
        if self._lock.acquire(blocking=False):
            try:
                if self._depth == 0:  # not in the middle of an engine call of this very thread
                    self._abort(request_id)
                    return
            finally:
                self._lock.release()
        self._dropped.append(request_id)

    def _reap(self) -> None:
        while self._dropped:
            self._abort(self._dropped.popleft())

    def has_unfinished(self) -> bool:
        """Requests still running, or outputs of `add_request` requests that `step()` has not handed
        out yet (they may have finished during a `generate` call or a stream): loop on `step()` until False."""
        return self.scheduler.has_unfinished() or any(rid not in self._owner for rid in self._mailbox)

    # ------------------------------------------------------------------ one step

    def step(self) -> list[StepOutput]:
        """Run one model step; return the new text (and results) of the requests added with
        `add_request` that it advanced (outputs of `generate`'s and streams' requests go to them)."""
        with self._exclusive():
            self._advance()
            mine = [rid for rid in self._mailbox if rid not in self._owner]
            return [out for rid in mine for out in self._mailbox.pop(rid)]

    def _advance(self) -> None:
        """One step; every output into its request's mailbox."""
        self._reap()
        for out in self._step():
            self._mailbox[out.request_id].append(out)

    def _take(self, request_id: int) -> list[StepOutput]:
        """The outputs waiting for `request_id`; once its result is among them, it is forgotten."""
        outputs = self._mailbox.pop(request_id, [])
        if any(out.result is not None for out in outputs):
            self._owner.pop(request_id, None)
        return outputs

    def _step(self) -> list[StepOutput]:
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
        try:
            sampled, failed, logprobs = self.runner.execute(batch, images)
        except Exception as e:  # noqa: BLE001 - the step's requests fail, the engine goes on
            for seq in batch.seqs:  # what the step wrote into their blocks is not to be trusted
                message = f"request {seq.seq_id}: the model step failed: {type(e).__name__}: {e}"
                self.kv_cache.scrub(self.scheduler.finish(seq, "error", message, discard=True))
                outputs.append(self._finalize(seq))
            return outputs
        self.stats.steps += 1
        self.stats.vision_calls = self.runner.num_vision_calls
        self.scheduler.postprocess(batch, sampled)
        for i, message in failed.items():  # non-finite logits: that request alone fails, its K/V is scrubbed
            self.kv_cache.scrub(self.scheduler.finish(batch.seqs[i], "error", message, discard=True))
            outputs.append(self._finalize(batch.seqs[i]))

        for i, (seq, token) in enumerate(zip(batch.seqs, sampled)):
            if token is None:
                continue
            request = self.requests[seq.seq_id]
            if request.first_token_at is None:
                request.first_token_at = time.perf_counter()
            if request.logprobs is not None and i in logprobs:
                request.logprobs.append(logprobs[i])
            text = ""
            if request.output is not None:
                if request.output.add(token):  # a stop string
                    self.scheduler.finish(seq, "stop")
                if not seq.is_finished:  # else _finalize hands out the rest
                    text = request.output.new_text()
            if seq.is_finished:
                outputs.append(self._finalize(seq))
            elif text or request.logprobs:
                new = request.new_logprobs()
                if text or new:
                    outputs.append(StepOutput(seq.seq_id, text, logprobs=new))
        return outputs

    def _finalize(self, seq: Sequence) -> StepOutput:
        request = self.requests.pop(seq.seq_id, None)
        self.sampler.remove(seq.seq_id)
        text = rest = ""
        if request is not None and request.output is not None:
            text, rest = request.output.finish()
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
            logprobs=None if request is None or request.logprobs is None else list(request.logprobs),
        )
        return StepOutput(seq.seq_id, rest, result, logprobs=[] if request is None else request.new_logprobs())

    # ------------------------------------------------------------------ high level

    def generate(
        self,
        conversations: list[Messages | PromptInputs] | Messages,
        params: SamplingParams | list[SamplingParams] = SamplingParams(),
        **processor_options: Any,
    ) -> list[GenerationResult]:
        """Run every conversation to completion, batched; results in input order.

        A conversation that fails (bad image, too long, non-finite logits...) gets a result with
        finish_reason "error" and the message in `.error`; the others are not affected. However this
        call ends (an exception, KeyboardInterrupt), none of its requests stays behind."""
        if isinstance(conversations, (str, dict)):
            raise TypeError(
                "generate takes a list of conversations (or one conversation: a list of messages), got a "
                f"{type(conversations).__name__}; e.g. [[{{'role': 'user', 'content': 'Hello'}}]]"
            )
        if not isinstance(conversations, (list, tuple)):
            raise TypeError(f"generate takes a list of conversations, got a {type(conversations).__name__}")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # one conversation given as a list of messages
        if isinstance(params, SamplingParams):
            params = [params] * len(conversations)
        if not isinstance(params, (list, tuple)):
            raise TypeError(f"params must be a SamplingParams or a list of them, got {type(params).__name__}")
        if len(params) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(params)} SamplingParams")
        options = self._options(processor_options)
        for p in params:
            _check_params(p)
        self._check_model()
        with self._exclusive():
            owner = object()  # this call
            results: list[GenerationResult | None] = [None] * len(conversations)
            ids: dict[int, int] = {}  # request id -> index
            waiting: set[int] = set()  # request ids whose result has not come yet
            preparing: dict[Future, int] = {}  # media being read and decoded -> index
            pool = None

            def admit(index: int, prepare) -> None:
                """Queue conversation `index` (its prompt from `prepare()`), or record why it cannot run."""
                try:
                    request_id = self._add(prepare(), params[index], owner)
                    ids[request_id] = index
                    waiting.add(request_id)
                except Exception as e:  # noqa: BLE001 - a bad conversation fails alone
                    # ProcessorError and RequestError are ValueErrors with full messages; name anything else
                    reason = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
                    if not reason.startswith(f"conversation {index}:"):  # the processor names it already
                        reason = f"conversation {index}: {reason}"
                    results[index] = GenerationResult(-1, "", [], "error", error=reason)

            try:
                with_media = [i for i, c in enumerate(conversations) if _has_media(c)]
                if with_media and len(conversations) > 1:  # media read beside the model steps: a slow URL stalls no one
                    pool = ThreadPoolExecutor(min(MEDIA_THREADS, len(with_media)), thread_name_prefix="smolvlm-media")
                    preparing = {pool.submit(self._prompt, conversations[i], index=i, **options): i for i in with_media}
                in_pool = set(preparing.values())
                for index, conversation in enumerate(conversations):
                    if index not in in_pool:
                        admit(index, lambda c=conversation, i=index: self._prompt(c, index=i, **options))
                while waiting or preparing:
                    if preparing:  # admit what is ready; with nothing to step, wait for the next one
                        done, _ = wait(preparing, timeout=None if not waiting else 0, return_when=FIRST_COMPLETED)
                        for future in done:
                            admit(preparing.pop(future), future.result)
                    for rid in list(waiting):
                        for out in self._take(rid):
                            if out.result is not None:
                                results[ids[rid]] = out.result
                                waiting.discard(rid)
                    if waiting:
                        self._advance()
            finally:
                if pool is not None:  # after an exception: media still being read are not waited for
                    pool.shutdown(wait=False, cancel_futures=True)
                for rid in ids:  # normally all finished; after an exception, abort what is left
                    self._abort(rid)
        return results  # type: ignore[return-value]

    def stream(
        self, conversation: Messages | PromptInputs, params: SamplingParams = SamplingParams(), **processor_options: Any
    ) -> "Stream":
        """One request, its answer text piece by piece: `for piece in engine.stream(...)`. The request is
        queued now (a bad one raises here); afterwards the stream's `.result` is its GenerationResult."""
        _check_params(params)
        self._check_model()
        prompt = self._prompt(conversation, **self._options(processor_options))
        with self._exclusive():
            stream = Stream(self)
            stream.request_id = self._add(prompt, params, stream.owner)
        return stream


class Stream:
    """The text of one request as it is generated. Iterate for the pieces; once the iteration ends,
    `.result` holds the GenerationResult (token ids, finish reason, counts). A failed request raises
    RequestError from the iteration. Closing early (`close()`, or dropping the stream unfinished, e.g.
    leaving a `for` loop over `engine.stream(...)`) aborts the request and gives its KV blocks back."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.owner = object()  # the consumer of this request's outputs (not `self`: no cycle, see __del__)
        self.request_id = -1
        self.result: GenerationResult | None = None
        self._pending: list[str] = []  # pieces taken but not handed out yet

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        engine = self.engine
        with engine._exclusive():
            try:
                while not self._pending:
                    finished = self.request_id not in engine.requests and not engine._mailbox.get(self.request_id)
                    if self.result is not None or finished:
                        raise StopIteration  # its result was handed out, or it was aborted
                    outputs = engine._take(self.request_id)
                    if not outputs:
                        engine._advance()
                        continue
                    for out in outputs:
                        if out.text:
                            self._pending.append(out.text)
                        if out.result is not None:
                            self.result = out.result
                            if out.result.finish_reason == "error":
                                raise RequestError(out.result.error or "generation failed")
            except StopIteration:
                raise
            except BaseException:  # a failed request, a failed step or an interrupt: nothing stays queued
                engine._abort(self.request_id)
                raise
            return self._pending.pop(0)

    def close(self) -> None:
        """Stop early: abort the request (if it is still running) and give its KV blocks back."""
        self.engine.abort(self.request_id)

    def __del__(self) -> None:  # a stream dropped unfinished must not keep its request or outputs
        if self.result is None and self.request_id >= 0:
            self.engine._drop(self.request_id)


def _check_params(params: object) -> None:
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")


def _has_media(conversation: object) -> bool:
    """Whether a conversation names an image or a video (then its preparation may read files or URLs)."""
    if not isinstance(conversation, list):
        return False
    for message in conversation:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(item, dict) and item.get("type") in ("image", "image_url", "video") for item in content
        ):
            return True
    return False


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
