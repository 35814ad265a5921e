"""Training data: JSONL conversations -> labelled examples -> padded batches.

One conversation per line, in the message format the processor takes:

    {"messages": [{"role": "user", "content": [{"type": "image", "path": "a.jpg"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}

Relative media paths resolve against the JSONL file's folder. Every line is checked before training
starts (JSON, messages, media decodable, an assistant turn, the length within the context), so a
bad line fails in the first minute, naming its line, never at step 900; `skip_bad=True` drops the
bad lines instead and reports each. The checked lines are kept as messages: pixels are decoded again
when a batch needs them (decoding is cheap next to a training step, and a dataset of photos does not
fit in memory as float tensors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smolvlm.processing import LabelledConversation, Processor, ProcessorError

IGNORE = -100  # label of a position without loss (transformers' and PyTorch's convention)


class DataError(ValueError):
    """A training example that cannot be used; the message names its file and line."""


@dataclass
class Example:
    source: str  # "file.jsonl:LINE"
    messages: list[dict[str, Any]]  # media paths resolved to absolute paths
    num_tokens: int  # tokens of the whole conversation (as checked)
    num_labels: int  # of them, tokens with a loss


@dataclass
class Batch:
    """Right-padded rows. labels (B, T): IGNORE where no loss; position t predicts labels[t] from
    tokens < t (the shift happens in the loss)."""

    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64, 1 = real token
    labels: torch.Tensor  # (B, T) int64
    pixel_values: torch.Tensor | None  # (B, N, 3, H, W) float32, all-zero padding tiles
    pixel_attention_mask: torch.Tensor | None  # (B, N, H, W)
    media: list[list[tuple[str, int]]]  # per row, per media item in prompt order: (content hash, tiles)
    sources: list[str]

    @property
    def num_labels(self) -> int:
        """Tokens that carry a loss: labels after the shift by one."""
        return int((self.labels[:, 1:] != IGNORE).sum())


def _resolve_media(messages: Any, folder: Path) -> Any:
    """The messages with relative `path` / `image` / `video` strings of media items made absolute
    against `folder` (URLs and data URIs are left as they are)."""
    if not isinstance(messages, list):
        return messages
    out = []
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            content = []
            for item in message["content"]:
                if isinstance(item, dict) and item.get("type") in ("image", "video"):
                    item = dict(item)
                    for key in ("path", "image", "video"):
                        value = item.get(key)
                        if isinstance(value, str) and "://" not in value and not value.startswith("data:"):
                            item[key] = str(folder / Path(value).expanduser())
                content.append(item)
            message = {**message, "content": content}
        out.append(message)
    return out


def parse_line(line: str, source: str, folder: Path) -> list[dict[str, Any]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError(f"{source}: expected an object with a 'messages' list")
    if not isinstance(record["messages"], list) or not record["messages"]:
        raise DataError(f"{source}: 'messages' must be a non-empty list")
    return _resolve_media(record["messages"], folder)


def label(processor: Processor, messages: list[dict[str, Any]], source: str, options: dict[str, Any]) -> LabelledConversation:
    try:
        return processor.prepare_labelled(messages, **options)
    except ProcessorError as e:
        raise DataError(f"{source}: {str(e).removeprefix('conversation 0: ').removeprefix('conversation 0, ')}") from None


def read_examples(path: str | Path, processor: Processor, options: dict[str, Any], *, skip_bad: bool = False,
                  progress: bool = True, what: str = "training data") -> tuple[list[Example], list[str]]:
    """Check every line of a JSONL file -> (examples, one message per skipped line).
    Without `skip_bad`, the first bad line raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    folder = path.resolve().parent
    examples, skipped = [], []
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    from tqdm.auto import tqdm

    for n, line in tqdm(numbered, desc=f"checking {path.name}", unit="example", disable=not progress, leave=False):
        source = f"{path}:{n}"
        try:
            messages = parse_line(line, source, folder)
            labelled = label(processor, messages, source, options)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        examples.append(Example(source, messages, len(labelled.item.input_ids), sum(t != IGNORE for t in labelled.labels)))
    if not examples:
        raise DataError(f"{path}: no usable example" + (f" ({len(skipped)} bad lines skipped)" if skipped else ""))
    return examples, skipped


def collate(processor: Processor, labelled: list[LabelledConversation], sources: list[str]) -> Batch:
    items = [c.item for c in labelled]
    tensors = processor.collate(items, padding_side="right")
    labels = torch.full_like(tensors["input_ids"], IGNORE)
    for b, c in enumerate(labelled):
        labels[b, : len(c.labels)] = torch.tensor(c.labels, dtype=torch.int64)
    return Batch(
        input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"], labels=labels,
        pixel_values=tensors.get("pixel_values"), pixel_attention_mask=tensors.get("pixel_attention_mask"),
        media=[[(m.sha256, m.num_tiles) for m in item.media] for item in items], sources=sources,
    )


def make_batch(processor: Processor, examples: list[Example], options: dict[str, Any]) -> Batch:
    """Decode and pad `examples` (checked before, so a failure here means a file changed since)."""
    return collate(processor, [label(processor, e.messages, e.source, options) for e in examples],
                   [e.source for e in examples])
