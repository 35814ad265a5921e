"""Fine-tuning, top to bottom: settings, data, model, optimizer, the loop, evaluation, checkpoints.

    smolvlm finetune --model M --data train.jsonl --output DIR            # LoRA r=8 on the decoder
    torchrun --nproc-per-node 2 -m smolvlm.cli finetune ...               # several processes (DDP)

What trains: LoRA adapters on the decoder's projections (`lora_rank > 0`, the published recipes'
choice), and/or whole parts (`train=("connector", "decoder")`; the vision tower stays frozen unless
named). Everything else is frozen with requires_grad=False. The output is a PEFT adapter directory
when only adapters trained, else a full checkpoint directory (adapters merged in).

The batch of one optimizer step is `batch_size x grad_accum x processes` conversations, taken in
order from a stream of per-epoch shuffles (seeded), so the step number alone says which examples
come next: resuming needs only the step, the trained weights, AdamW's moments and the random state.
The loss is the mean over the step's labelled tokens, whichever process and micro-batch holds them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from smolvlm.train.checkpoint import ResumeError, latest_state, load_state, read_state, save_model_dir, save_state
from smolvlm.train.data import DataError, Example, make_batch, read_examples
from smolvlm.train.lora import DECODER_PROJECTIONS, AdapterError, LoraConfig, add_lora, decoder_targets, merge_lora, save_adapter
from smolvlm.engine.runner import VisionFeatureCache
from smolvlm.train.loss import LanguageModelLoss
from smolvlm.train.plot import loss_curve

PARTS = ("vision", "connector", "decoder")


@dataclass
class FinetuneConfig:
    model: str
    data: str
    output: str
    eval_data: str | None = None
    # what trains
    lora_rank: int = 8  # 0: no adapters (then `train` must name a part)
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DECODER_PROJECTIONS
    train: tuple[str, ...] = ()  # parts trained in full: vision, connector, decoder
    # how long
    steps: int | None = None  # optimizer steps; or
    epochs: float | None = None  # passes over the data (default 1 when neither is given)
    # optimizer (AdamW, linear warm-up then cosine decay to zero)
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 0  # steps
    max_grad_norm: float | None = 1.0
    batch_size: int = 1  # conversations per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    # precision and memory
    dtype: str = "float32"  # float32, or bfloat16 (autocast; weights and optimizer stay fp32)
    device: str = "cpu"
    gradient_checkpointing: bool = False
    feature_cache_gb: float = 1.0  # image features kept while vision + connector are frozen (0: off)
    # data
    do_image_splitting: bool | None = None  # None: the checkpoint's setting
    video_fps: float | None = None
    video_max_frames: int | None = None
    skip_bad_examples: bool = False
    # bookkeeping
    seed: int = 0
    save_every: int = 0  # steps between training-state checkpoints (0: only at the end)
    eval_every: int = 0  # steps between evaluations (0: only at the end)
    resume: str | None = None  # a checkpoint-STEP directory, or "latest" (the newest under output)
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes stored with the run

    def check(self) -> None:
        unknown = [p for p in self.train if p not in PARTS]
        if unknown:
            raise ValueError(f"--train: unknown part(s) {unknown}; choose among {', '.join(PARTS)}")
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank == 0 and not self.train:
            raise ValueError("nothing to train: give --lora-rank > 0 or --train PARTS")
        if self.lora_rank and "decoder" in self.train:
            raise ValueError("--train decoder trains every decoder weight; LoRA on the decoder as well makes no sense "
                             "(pass --lora-rank 0 for a full fine-tune)")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and not self.epochs > 0:
            raise ValueError("--steps must be >= 1 and --epochs > 0")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16 (float16 training needs loss scaling), got {self.dtype!r}")
        if self.warmup < 0 or self.save_every < 0 or self.eval_every < 0 or self.feature_cache_gb < 0 \
                or self.weight_decay < 0 or (self.max_grad_norm is not None and not self.max_grad_norm >= 0):
            raise ValueError("--warmup, --save-every, --eval-every, --feature-cache-gb, --weight-decay and "
                             "--max-grad-norm must be >= 0")
        if self.lora_rank:  # the adapter's settings, before any data is read
            try:
                LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                           target_modules=decoder_targets(list(self.lora_targets)))
            except AdapterError as e:
                raise ValueError(str(e)) from None


@dataclass
class FinetuneResult:
    output: Path
    steps: int
    losses: list[float]  # training loss per step (this run and the resumed part)
    eval_losses: list[tuple[int, float]]
    skipped: list[str]  # one message per bad example skipped
    kind: str  # "adapter" or "checkpoint"


def learning_rate(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total` (step counts from 0)."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def step_examples(examples: list[Example], step: int, global_batch: int, seed: int) -> list[Example]:
    """The examples of optimizer step `step`: the next `global_batch` of the stream of per-epoch
    shuffles (epoch e shuffled by a generator seeded with (seed, e))."""
    n, out, orders = len(examples), [], {}
    for position in range(step * global_batch, (step + 1) * global_batch):
        epoch, offset = divmod(position, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        out.append(examples[orders[epoch][offset]])
    return out


def _distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun the process group is started here: NCCL when CUDA is
    available, else gloo (SMOLVLM_DDP_BACKEND=gloo forces gloo, e.g. for CPU processes on a GPU machine)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and os.environ.get("SMOLVLM_DDP_BACKEND") != "gloo"
                                else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _sum(values: list[float], world: int, device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _rng_states(rank: int, world: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Every process's random-generator state (uint8 tensors of a fixed size), gathered as tensors."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return {f"{kind}_rank0": state for kind, state in mine.items()}
    out = {}
    for kind, state in mine.items():
        local = state.to(device)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        out.update({f"{kind}_rank{r}": g.cpu() for r, g in enumerate(gathered)})
    return out


def finetune(config: FinetuneConfig) -> FinetuneResult:
    from tqdm.auto import tqdm

    from smolvlm.model import SmolVLM
    from smolvlm.processing import Processor
    from smolvlm.weights import resolve_checkpoint

    config.check()
    device = torch.device(config.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")  # one GPU per process
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives and CUDA random state act on the current device
    rank, world = _distributed()
    output = Path(config.output)
    show = config.progress and rank == 0
    if not config.resume and output.is_dir() and (
            any(output.glob("checkpoint-*")) or any((output / f).exists() for f in ("adapter_model.safetensors", "model.safetensors"))):
        raise ValueError(f"{output} already holds a fine-tuning run; pass --resume latest to continue it, "
                         "or choose another --output (nothing is overwritten)")

    # The settings a resumed run must share with the run that wrote its checkpoint (checked now,
    # before the data and the model are read): what changes the numbers or the stream of examples.
    settings = {k: v for k, v in asdict(config).items() if k not in (
        "resume", "progress", "steps", "epochs", "save_every", "eval_every", "extra", "output", "device", "feature_cache_gb")}
    settings["world_size"] = world
    if not Path(config.data).is_file():
        raise DataError(f"training data {config.data} does not exist")
    settings["data_sha256"] = hashlib.sha256(Path(config.data).read_bytes()).hexdigest()  # the same stream of examples
    settings = json.loads(json.dumps(settings))  # as state.json holds them (tuples are lists)
    resume = None
    if config.resume:
        directory = latest_state(output) if config.resume == "latest" else Path(config.resume)
        if directory is None:
            raise ResumeError(f"--resume latest: no checkpoint-STEP directory under {output}")
        saved = read_state(directory)
        changed = sorted(k for k in settings if saved.get("settings", {}).get(k) != settings[k])
        if changed:
            raise ResumeError(f"{directory} was written by a run with different settings: "
                              + ", ".join(f"{k} {saved.get('settings', {}).get(k)!r} -> {settings[k]!r}" for k in changed))
        resume = directory, saved

    # ---------------------------------------------------------------- data (every line checked now)
    base_dir = resolve_checkpoint(config.model)
    processor = Processor.from_pretrained(base_dir)
    options = {k: v for k, v in (("do_image_splitting", config.do_image_splitting), ("video_fps", config.video_fps),
                                 ("video_max_frames", config.video_max_frames)) if v is not None}
    examples, skipped = read_examples(config.data, processor, options, skip_bad=config.skip_bad_examples, progress=show)
    eval_examples = []
    if config.eval_data:
        eval_examples, eval_skipped = read_examples(config.eval_data, processor, options, what="evaluation data",
                                                    skip_bad=config.skip_bad_examples, progress=show)
        skipped += eval_skipped
    if skipped and show:
        print(f"skipped {len(skipped)} bad example(s):")
        for message in skipped[:20]:
            print(f"  {message}")
    global_batch = config.batch_size * config.grad_accum * world
    total_steps = config.steps or max(1, math.ceil((config.epochs or 1.0) * len(examples) / global_batch))

    # ---------------------------------------------------------------- model: freeze, then choose what trains
    model = SmolVLM.from_pretrained(base_dir, dtype=torch.float32, device=device)
    model.requires_grad_(False)
    parts = {"vision": model.model.vision_model, "connector": model.model.connector, "decoder": model.model.text_model}
    for part in config.train:
        parts[part].requires_grad_(True)
    if "decoder" in config.train and not model.config.tie_word_embeddings:
        model.lm_head.requires_grad_(True)
    lora = None
    torch.manual_seed(config.seed)  # the adapters' initial A matrices
    if config.lora_rank:
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=decoder_targets(list(config.lora_targets)))
        add_lora(model, lora)  # new parameters: requires_grad=True
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trained_vision = bool({"vision", "connector"} & set(config.train))
    cache = None  # frozen tower: an image seen before need not go through it again
    if not trained_vision and config.feature_cache_gb > 0:
        cache = VisionFeatureCache(int(config.feature_cache_gb * 2**30))
    objective = LanguageModelLoss(model, checkpoint=config.gradient_checkpointing, feature_cache=cache)
    runner = objective
    if world > 1:  # the model already sits on this process's device; batches move in the objective
        runner = torch.nn.parallel.DistributedDataParallel(
            objective, find_unused_parameters=trained_vision)  # a batch without images leaves the tower unused

    # ---------------------------------------------------------------- optimizer: AdamW, no decay on norms and biases
    decay = [p for n, p in trainable if p.dim() >= 2]
    no_decay = [p for n, p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.999), eps=1e-8)

    # ---------------------------------------------------------------- resume
    start, losses, eval_losses = 0, [], []
    if resume is not None:
        directory, saved = resume
        rng = load_state(directory, model, optimizer)
        torch.set_rng_state(rng[f"cpu_rank{rank}"])
        if f"cuda_rank{rank}" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng[f"cuda_rank{rank}"], device)
        start, losses, eval_losses = saved["step"], saved["losses"], [tuple(e) for e in saved["eval_losses"]]
        if saved.get("total_steps") != total_steps:  # the learning-rate schedule depends on the run's length
            raise ResumeError(f"{directory} belongs to a run of {saved.get('total_steps')} steps; this one would be "
                              f"{total_steps} (give the same --steps / --epochs as the run it continues)")
    else:
        torch.manual_seed(config.seed + rank)  # dropout differs between processes, as their data does

    output.mkdir(parents=True, exist_ok=True)
    metrics_path = output / "metrics.jsonl"
    if rank == 0:  # the log as of `start`: a resumed run rewrites what came after its checkpoint
        kept = []
        if start and metrics_path.is_file():
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line).get("step", 0) <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.dtype == "bfloat16" else nullcontext()

    def batch_of(chosen: list[Example]):
        """The examples decoded and padded. They were checked at the start, so a failure here means a
        file changed since: with --skip-bad-examples the example is dropped and reported, else it stops
        the run naming its line."""
        try:
            return make_batch(processor, chosen, options)
        except DataError as e:
            if not config.skip_bad_examples:
                raise
            good = []
            for example in chosen:
                try:
                    make_batch(processor, [example], options)
                    good.append(example)
                except DataError as bad:
                    skipped.append(str(bad))
                    print(f"skipping {bad}", file=sys.stderr)
            if not good and world > 1:  # every process must take part in each step
                raise DataError(f"a whole micro-batch became unreadable during training ({e})") from None
            return make_batch(processor, good, options) if good else None

    def evaluate(step: int) -> float:
        """Mean loss per labelled token over the evaluation data (this process's share, then summed)."""
        model.eval()
        loss_sum, tokens = 0.0, 0
        mine = eval_examples[rank::world]
        with torch.no_grad(), autocast:
            for i in range(0, len(mine), config.batch_size):
                batch = batch_of(mine[i : i + config.batch_size])
                if batch is None:
                    continue
                loss_sum += float(objective(batch))
                tokens += batch.num_labels
        model.train()
        loss_sum, tokens = _sum([loss_sum, tokens], world, device)
        return loss_sum / max(tokens, 1)

    def checkpoint(step: int) -> None:
        rngs = _rng_states(rank, world, device)  # every process's, so each resumes its own dropout stream
        if rank == 0:
            directory = output / f"checkpoint-{step}"
            save_state(directory, model, optimizer, rngs,
                       {"step": step, "total_steps": total_steps, "settings": settings, "losses": losses,
                        "eval_losses": eval_losses,
                        "examples": len(examples), "skipped": len(skipped)})
            if lora and not config.train:  # a usable adapter as of this step (with --train, parts are not in it)
                save_adapter(model, directory, lora, base_model=str(config.model))
        if world > 1:
            dist.barrier()

    # ---------------------------------------------------------------- the loop
    bar = tqdm(total=total_steps, initial=start, desc="fine-tuning", unit="step", disable=not show, dynamic_ncols=True)
    started, tokens_seen = time.perf_counter(), 0
    for step in range(start, total_steps):
        lr = learning_rate(step, total_steps, config.warmup, config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        chosen = step_examples(examples, step, global_batch, config.seed)
        micro = [chosen[(j * world + rank) * config.batch_size : (j * world + rank + 1) * config.batch_size]
                 for j in range(config.grad_accum)]
        batches = [batch_of(m) for m in micro]
        batches = [b for b in batches if b is not None]
        local_tokens = sum(b.num_labels for b in batches)
        step_tokens = _sum([float(local_tokens)], world, device)[0]
        loss_sum = 0.0
        for j, batch in enumerate(batches):
            sync = j == len(batches) - 1 or world == 1
            with (nullcontext() if sync else runner.no_sync()), autocast:
                token_loss = runner(batch)
            # DDP averages gradients over processes: scale so the result is the step's mean over tokens
            (token_loss * world / max(step_tokens, 1)).backward()
            loss_sum += float(token_loss.detach())
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = _sum([loss_sum], world, device)[0] / max(step_tokens, 1)
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step + 1}: the loss is {loss}; lower --lr (now {config.lr}) or check the data")
        losses.append(loss)
        tokens_seen += sum(int(b.attention_mask.sum()) for b in batches) * world
        elapsed = time.perf_counter() - started
        record = {"step": step + 1, "loss": loss, "lr": lr, "label_tokens": int(step_tokens),
                  "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}
        if eval_examples and config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total_steps:
            eval_losses.append((step + 1, evaluate(step + 1)))
            record["eval_loss"] = eval_losses[-1][1]
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_seen / elapsed:.0f}", refresh=False)
        bar.update(1)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            checkpoint(step + 1)
    bar.close()

    # ---------------------------------------------------------------- the result
    if eval_examples and (not eval_losses or eval_losses[-1][0] != total_steps):
        eval_losses.append((total_steps, evaluate(total_steps)))
        if rank == 0:
            with metrics_path.open("a") as f:
                f.write(json.dumps({"step": total_steps, "eval_loss": eval_losses[-1][1]}) + "\n")
    checkpoint(total_steps)
    kind = "adapter" if lora and not config.train else "checkpoint"
    if rank == 0:
        if kind == "adapter":
            save_adapter(model, output, lora, base_model=str(config.model))
        else:
            merge_lora(model)
            save_model_dir(model, base_dir, output)
        loss_curve(list(enumerate(losses, 1)), eval_losses, output / "loss.png",
                   f"{Path(config.data).name}: {total_steps} steps, batch {global_batch}, lr {config.lr:g}")
        if show and objective.cache_hits:
            print(f"image features reused {objective.cache_hits} times (vision tower frozen)")
    if world > 1:
        dist.barrier()
    return FinetuneResult(output, total_steps, losses, eval_losses, skipped, kind)


__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "learning_rate", "step_examples",
           "DataError", "AdapterError", "ResumeError"]
