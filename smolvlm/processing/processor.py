"""The Processor: conversations in, model inputs out (input_ids, pixel_values, pixel_attention_mask).

    proc = Processor.from_pretrained("HuggingFaceTB/SmolVLM2-256M-Video-Instruct")   # or a directory
    batch = proc(messages, add_generation_prompt=True)        # dict of tensors, transformers' keys/values
    item = proc.prepare(messages)                             # one ProcessedConversation (+ content hashes)

`proc(messages)` returns what transformers 5.24 returns for
`SmolVLMProcessor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
return_dict=True, return_tensors="pt")` with the Pillow image processor: same keys, identical
input_ids / attention_mask / pixel_attention_mask, identical pixel_values (bit for bit on this
machine). The steps of one conversation (`prepare`), each in its own file:

    messages --chat_template.py--> prompt with one <image> / <video> per media item
             --image.py / video.py--> uint8 tiles per item (+ rows/cols, frame timestamps)
             --prompt.py--> placeholders expanded to tile markers and <image> runs
             --tokenizer.py--> input_ids          --pixels.py--> float32 tiles, content hash

A list of conversations is a padded batch (`collate`). Padding is on the LEFT by default: the batch
is meant for generation, where every row's last prompt token must sit in the last column
(transformers pads on the tokenizer's side, right, unless told; pass padding_side="right" for that).

Where we deliberately differ from transformers (it is either broken or silent there):
- string message content renders as one text item (transformers' image template drops it);
- images and videos may be mixed in one conversation or batch: tiles follow prompt order
  (transformers overwrites image pixel_values with the video's);
- unknown content types, a placeholder count that does not match the media, a prompt longer than the
  context all raise `ProcessorError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smolvlm.processing import chat_template
from smolvlm.processing.config import ProcessorConfig, load_processor_config
from smolvlm.processing.errors import ProcessorError
from smolvlm.processing.image import open_image, split_image, tile_grid
from smolvlm.processing.pixels import image_normalization, pad_batch, tiles_sha256, video_normalization
from smolvlm.processing.prompt import expand_placeholders, image_prompt, video_prompt
from smolvlm.processing.tokenizer import Tokenizer
from smolvlm.processing.video import duration_text, probe_video, read_frames, resize_frames, timestamp_texts

# What `from_pretrained` downloads for a hub repo id (nothing else: no weights).
PROCESSOR_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "config.json",
]

Messages = list[dict[str, Any]]


@dataclass
class MediaItem:
    """One image or video of a conversation, in prompt order."""

    kind: str  # "image" or "video"
    sha256: str  # hash of the tiles as the model sees them (uint8 bytes + shape + normalisation)
    num_tiles: int  # tiles (image) or frames (video) this item contributes to pixel_values
    rows: int = 0  # image split grid, 0 x 0 when unsplit
    cols: int = 0
    timestamps: list[str] = field(default_factory=list)  # video: MM:SS per sampled frame
    duration: str = ""  # video: H:MM:SS of the whole source


@dataclass
class ProcessedConversation:
    input_ids: list[int]
    prompt: str  # the expanded prompt text that was tokenized
    pixel_values: torch.Tensor | None  # (N, 3, H, W) float32, all items' tiles in prompt order
    media: list[MediaItem]

    @property
    def image_hashes(self) -> list[str]:
        """Content hash per media item, for prefix caches that must not confuse two images."""
        return [m.sha256 for m in self.media]


@dataclass
class LabelledConversation:
    """A conversation for training: its model inputs and, per token, the label (-100: no loss)."""

    item: ProcessedConversation
    labels: list[int]  # labels[t] = input_ids[t] on assistant tokens; the loss shifts by one


def _content_items(messages: Messages, index: int) -> Messages:
    """Validate a conversation and return it in normal form: no None-valued keys, list content
    (a string becomes one text item), OpenAI image_url blocks as image blocks."""
    if not isinstance(messages, list) or not messages:
        raise ProcessorError(f"conversation {index} must be a non-empty list of messages, got {type(messages).__name__}")
    normal = []
    for m, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ProcessorError(f"conversation {index}, message {m}: expected a dict with a 'role', got {message!r:.80}")
        if not isinstance(message["role"], str) or not message["role"]:
            raise ProcessorError(f"conversation {index}, message {m}: 'role' must be a non-empty string, got {message['role']!r:.80}")
        message = {k: v for k, v in message.items() if v is not None}
        content = message.get("content", [])
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ProcessorError(f"conversation {index}, message {m}: content must be a string or a list")
        if not content:
            raise ProcessorError(f"conversation {index}, message {m}: content is empty (give a text, image or video item)")
        items = []
        for c, item in enumerate(content):
            where = f"conversation {index}, message {m}, item {c}"
            if not isinstance(item, dict) or "type" not in item:
                raise ProcessorError(f"{where}: expected a dict with a 'type', got {item!r:.80}")
            if item["type"] == "image_url":  # OpenAI form {"type": "image_url", "image_url": {"url": ...}}
                url = item.get("image_url")
                item = {"type": "image", "url": url.get("url", "") if isinstance(url, dict) else url}
            kind = item["type"]
            if kind == "text" and not isinstance(item.get("text"), str):
                raise ProcessorError(f"{where}: text item needs a string 'text'")
            if kind == "text":
                _check_unicode(item["text"], where)
            if kind == "video" and not any(k in item for k in ("video", "url", "path")):
                raise ProcessorError(f"{where}: video item needs a 'path' (or 'video' / 'url')")
            if kind not in ("text", "image", "video"):
                raise ProcessorError(f"{where}: unknown content type {kind!r} (text, image, video)")
            items.append(item)
        message["content"] = items
        normal.append(message)
    return normal


def _check_unicode(text: str, where: str) -> None:
    """Text that cannot be UTF-8 (a lone surrogate, e.g. from a broken JSON escape) is refused by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ProcessorError(
            f"{where}: the text is not valid Unicode ({e.reason}: {text[e.start:e.end]!r} at character {e.start})"
        ) from None


class Processor:
    def __init__(self, tokenizer: Tokenizer, config: ProcessorConfig, video_backend: str = "auto"):
        self.tokenizer = tokenizer
        self.config = config
        self.video_backend = video_backend
        self.image_token_id = tokenizer.token_to_id(config.tokens.image)
        # Fail at load time, not mid-batch, if the tokenizer lacks the expansion's tokens.
        for token in (config.tokens.fake_image, config.tokens.global_image):
            tokenizer.token_to_id(token)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        context_length: int | None = None,
        revision: str | None = None,
        video_backend: str = "auto",
    ) -> Processor:
        """Load from a checkpoint directory, or from a hub repo id (processor files only, cached by
        huggingface_hub). `context_length` overrides config.json's text_config.max_position_embeddings."""
        directory = Path(path_or_repo_id).expanduser()
        if not directory.is_dir():
            if directory.is_absolute() or str(path_or_repo_id).startswith((".", "~")) or directory.exists():
                raise ProcessorError(f"processor directory not found: {path_or_repo_id}")
            directory = _download(str(path_or_repo_id), revision)
        config = load_processor_config(directory, context_length=context_length)
        return cls(Tokenizer.from_directory(directory), config, video_backend=video_backend)

    # -----------------------------------------------------------------------------------------
    # One conversation
    # -----------------------------------------------------------------------------------------

    def render(self, messages: Messages, add_generation_prompt: bool = True, index: int = 0,
               *, video_template: bool | None = None) -> str:
        """The chat-template text, placeholders not yet expanded (transformers' apply_chat_template
        with tokenize=False). A conversation with a video uses transformers' video template;
        `video_template` forces the choice (the turns of one conversation render with one template)."""
        messages = _content_items(messages, index)
        has_video = any(item["type"] == "video" for m in messages for item in m["content"])
        if video_template is not None:
            has_video = video_template
        template = chat_template.VIDEO_CHAT_TEMPLATE if has_video else self.config.chat_template
        return chat_template.render(
            template, messages, add_generation_prompt=add_generation_prompt, **self.tokenizer.special_tokens_map
        )

    def prepare(
        self,
        messages: Messages,
        add_generation_prompt: bool = True,
        *,
        do_image_splitting: bool | None = None,
        image_longest_edge: int | None = None,
        video_fps: float | None = None,
        video_max_frames: int | None = None,
        index: int = 0,
        max_prompt_tokens: int | None = None,
        trusted: bool = True,
    ) -> ProcessedConversation:
        """Everything for one conversation; the keyword overrides apply to this call only.

        Cheap checks come first: the prompt's length is known from the media's sizes (image headers,
        video containers) before any pixel is decoded, so a prompt over the context (or over
        `max_prompt_tokens`, e.g. an engine's limit) fails in milliseconds whatever its media.
        `trusted=False` (a caller who must not learn about this machine's files): reading a local
        file fails with one message whatever the reason, so a missing file and an unreadable one
        look the same."""
        for flag, value in (("add_generation_prompt", add_generation_prompt), ("trusted", trusted)):
            if not isinstance(value, bool):
                raise ProcessorError(f"{flag} must be True or False, got {value!r}")
        config = self.config.with_overrides(do_image_splitting, image_longest_edge, video_fps, video_max_frames)
        limit = _prompt_limit(config.context_length, max_prompt_tokens)
        tokens = config.tokens
        messages = _content_items(messages, index)
        text = self.render(messages, add_generation_prompt, index)
        _check_unicode(text, f"conversation {index}: the rendered prompt")  # a role or other field
        media_items = [item for m in messages for item in m["content"] if item["type"] in ("image", "video")]

        n_images = sum(item["type"] == "image" for item in media_items)
        n_videos = len(media_items) - n_images
        if text.count(tokens.image) != n_images or text.count(tokens.video) != n_videos:
            raise ProcessorError(
                f"conversation {index}: the prompt has {text.count(tokens.image)} {tokens.image} and "
                f"{text.count(tokens.video)} {tokens.video} placeholders but the messages hold {n_images} "
                f"images and {n_videos} videos (is there a literal {tokens.image} in a text item?)"
            )
        # 1. Before opening anything: each image or video is at least one tile of image_seq_len tokens.
        at_least = len(media_items) * config.image_seq_len
        if limit is not None and at_least > limit[0]:
            raise ProcessorError(
                f"conversation {index}: {len(media_items)} images and videos need at least {at_least} tokens "
                f"({config.image_seq_len} each), longer than {limit[1]}"
            )
        # 2. Sizes only (headers, containers): the exact prompt, no pixels yet.
        opened = [self._open(item, config, trusted) for item in media_items]
        input_ids, prompt = self._encode(text, [media for media, _ in opened], config)
        self._check_length(input_ids, limit, index)
        # 3. Pixels.
        tiles, media = [], []
        for _, decode in opened:
            uint8_tiles, info = decode()
            tiles.append(uint8_tiles)
            media.append(info)
        if any(info.num_tiles != plan.num_tiles or (info.rows, info.cols) != (plan.rows, plan.cols)
               for info, (plan, _) in zip(media, opened)):  # EXIF stored after the pixels turned an image
            input_ids, prompt = self._encode(text, media, config)
            self._check_length(input_ids, limit, index)
        self._check_image_tokens(input_ids, media, config, index)
        if len({t.shape[2:] for t in tiles}) > 1:
            raise ProcessorError(f"conversation {index}: image tiles and video frames have different sizes")
        pixel_values = (tiles[0] if len(tiles) == 1 else torch.cat(tiles)) if tiles else None
        return ProcessedConversation(input_ids=input_ids, prompt=prompt, pixel_values=pixel_values, media=media)

    def prepare_labelled(self, messages: Messages, *, index: int = 0, **options: Any) -> LabelledConversation:
        """A whole conversation for training: `prepare(messages, add_generation_prompt=False)` plus
        labels, the token to predict at each position (-100: none). Only the assistant turns are
        labelled, each through its closing end-of-utterance token (what generation stops on; the
        newline after it is never generated, so it is not learned); the template's "Assistant:" lead,
        user turns, image tokens and the system prompt are not. Options as for `prepare`.

        How: the tokens of each turn are found by rendering the conversation up to the turn (with
        the generation prompt, as at inference) and through it; both must be prefixes of the whole
        conversation's tokens, else the template tokenizes a turn boundary differently and the
        conversation is refused rather than mislabelled."""
        messages = _content_items(messages, index)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant:
            raise ProcessorError(f"conversation {index}: no assistant turn, so nothing to learn")
        if assistant[0] == 0:
            raise ProcessorError(f"conversation {index}: starts with an assistant turn; a user (or system) turn must come first")
        for i in assistant:
            if any(item["type"] != "text" for item in messages[i]["content"]):
                raise ProcessorError(f"conversation {index}, message {i}: an assistant turn holds only text (images and videos go in user turns)")
            if not "".join(item["text"] for item in messages[i]["content"]).strip():
                raise ProcessorError(f"conversation {index}, message {i}: the assistant turn is empty")
        whole = self.prepare(messages, add_generation_prompt=False, index=index, **options)
        config = self.config.with_overrides(
            options.get("do_image_splitting"), options.get("image_longest_edge"), options.get("video_fps"),
            options.get("video_max_frames"))
        video = any(item["type"] == "video" for m in messages for item in m["content"])
        end = self.tokenizer.token_to_id(config.tokens.end_of_utterance)
        labels = [-100] * len(whole.input_ids)
        for i in assistant:
            n_media = sum(item["type"] in ("image", "video") for m in messages[:i] for item in m["content"])
            spans = []
            for upto, generation_prompt in ((i, True), (i + 1, False)):
                text = self.render(messages[:upto], generation_prompt, index, video_template=video)
                ids, _ = self._encode(text, whole.media[:n_media], config)
                if ids != whole.input_ids[: len(ids)]:
                    raise ProcessorError(
                        f"conversation {index}, message {i}: the tokens up to this turn are not a prefix of the "
                        "whole conversation's tokens (the chat template or tokenizer joins turns differently)")
                spans.append(len(ids))
            start, stop = spans
            closing = [t for t in range(start, stop) if whole.input_ids[t] == end]
            if not closing:
                raise ProcessorError(f"conversation {index}, message {i}: the template does not close the turn with "
                                     f"{config.tokens.end_of_utterance}")
            for t in range(start, closing[-1] + 1):
                labels[t] = whole.input_ids[t]
        return LabelledConversation(whole, labels)

    def _encode(self, text: str, media: list[MediaItem], config: ProcessorConfig) -> tuple[list[int], str]:
        """The rendered text with every placeholder expanded for its media item -> (input_ids, prompt)."""
        tokens = config.tokens
        expansions = {"image": [], "video": []}
        for m in media:
            if m.kind == "image":
                expansions["image"].append(image_prompt(m.rows, m.cols, config.image_seq_len, tokens))
            else:
                expansions["video"].append(video_prompt(m.timestamps, m.duration, config.image_seq_len, tokens))
        prompt = expand_placeholders(text, tokens, iter(expansions["image"]), iter(expansions["video"]))
        # transformers: no special tokens added when the prompt already starts with the BOS token
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos))), prompt

    def _open(self, item: dict, config: ProcessorConfig, trusted: bool):
        """One media item opened as far as its size -> (its MediaItem without a hash yet, a function
        that decodes it to ((N, 3, H, W) float32 tiles, final MediaItem))."""
        if item["type"] == "image":
            image = open_image(item, trusted)
            rows, cols = tile_grid(*image.size, config.image)
            plan = MediaItem("image", "", rows * cols + 1 if rows else 1, rows, cols)
            return plan, lambda: self._image_pixels(image, config)
        if config.video is None:
            raise ProcessorError("this checkpoint's preprocessor_config.json has no video settings")
        source = next(item[k] for k in ("video", "path", "url") if k in item)
        probe = probe_video(source, config.video, backend=self.video_backend, trusted=trusted)
        stamps = timestamp_texts(probe)
        plan = MediaItem("video", "", len(stamps), timestamps=stamps, duration=duration_text(probe))
        return plan, lambda: self._video_pixels(probe, plan, config, trusted)

    def _image_pixels(self, image, config: ProcessorConfig) -> tuple[torch.Tensor, MediaItem]:
        split = split_image(image.rgb(), config.image)
        s = config.image
        norm = image_normalization(s.do_rescale, s.rescale_factor, s.do_normalize, s.image_mean, s.image_std)
        uint8_tiles = torch.from_numpy(split.tiles)  # (N, 3, tile, tile)
        info = MediaItem("image", tiles_sha256(uint8_tiles, norm), len(uint8_tiles), split.rows, split.cols)
        return norm.apply(uint8_tiles), info

    def _video_pixels(self, probe, plan: MediaItem, config: ProcessorConfig, trusted: bool) -> tuple[torch.Tensor, MediaItem]:
        v = config.video
        frames = resize_frames(read_frames(probe, trusted).frames, v)  # (T, 3, S, S) uint8
        norm = video_normalization(v.do_rescale, v.rescale_factor, v.do_normalize, v.image_mean, v.image_std)
        info = MediaItem("video", tiles_sha256(frames, norm), len(frames), timestamps=plan.timestamps, duration=plan.duration)
        return norm.apply(frames), info

    def _check_length(self, input_ids: list[int], limit: tuple[int, str] | None, index: int) -> None:
        if limit is not None and len(input_ids) > limit[0]:
            raise ProcessorError(
                f"conversation {index}: the prompt is {len(input_ids)} tokens, longer than {limit[1]} "
                "(use fewer or smaller images: do_image_splitting=False, image_longest_edge, video_max_frames)"
            )

    def _check_image_tokens(self, input_ids: list[int], media: list[MediaItem], config: ProcessorConfig, index: int) -> None:
        expected = sum(m.num_tiles for m in media) * config.image_seq_len
        found = input_ids.count(self.image_token_id)
        if found != expected:  # a user text holding image markers, or a tokenizer that splits <image>
            raise ProcessorError(
                f"conversation {index}: {found} {config.tokens.image} tokens in input_ids but the "
                f"{len(media)} media items need {expected}"
            )

    # -----------------------------------------------------------------------------------------
    # Batches
    # -----------------------------------------------------------------------------------------

    def prepare_batch(self, conversations: list[Messages], add_generation_prompt: bool = True, **overrides) -> list[ProcessedConversation]:
        return [
            self.prepare(c, add_generation_prompt, index=i, **overrides) for i, c in enumerate(conversations)
        ]

    def collate(self, items: list[ProcessedConversation], padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Pad conversations into one batch: input_ids / attention_mask (B, T) int64, and when any
        conversation has media, pixel_values (B, N, 3, H, W) float32 and pixel_attention_mask (B, N, H, W) int64."""
        if padding_side not in ("left", "right"):
            raise ProcessorError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not items:
            raise ProcessorError("collate needs at least one conversation")
        length = max(len(item.input_ids) for item in items)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None and any(len(item.input_ids) != length for item in items):
            raise ProcessorError("the tokenizer has no pad_token, so conversations of different lengths cannot be batched")
        input_ids = torch.full((len(items), length), pad_id or 0, dtype=torch.int64)
        attention_mask = torch.zeros((len(items), length), dtype=torch.int64)
        for b, item in enumerate(items):
            n = len(item.input_ids)
            span = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[b, span] = torch.tensor(item.input_ids, dtype=torch.int64)
            attention_mask[b, span] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}

        if any(item.pixel_values is not None for item in items):
            only_videos = all(m.kind == "video" for item in items for m in item.media)
            batch["pixel_values"], batch["pixel_attention_mask"] = pad_batch(
                [item.pixel_values for item in items], padding_tile_mask=1 if only_videos else 0
            )
        return batch

    def __call__(
        self,
        messages: Messages | list[Messages],
        add_generation_prompt: bool = True,
        padding_side: str = "left",
        **overrides: Any,
    ) -> dict[str, torch.Tensor]:
        """One conversation (a list of messages) or a batch (a list of conversations) -> tensors.
        Overrides: do_image_splitting, image_longest_edge, video_fps, video_max_frames."""
        if isinstance(messages, list) and messages and isinstance(messages[0], list):
            conversations = messages
        else:
            conversations = [messages]
        items = self.prepare_batch(conversations, add_generation_prompt, **overrides)
        return self.collate(items, padding_side=padding_side)

    def decode(self, token_ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.flatten().tolist()
        elif hasattr(token_ids, "tolist"):  # numpy
            token_ids = token_ids.tolist()
        if not isinstance(token_ids, (list, tuple)) or any(
            not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in token_ids
        ):
            raise ProcessorError(f"decode takes a list of non-negative int token ids, got {str(token_ids)[:80]}")
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: list[list[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]


def _prompt_limit(context_length: int | None, max_prompt_tokens: int | None) -> tuple[int, str] | None:
    """The tighter of the model's context and the caller's limit, with words for it."""
    if max_prompt_tokens is not None and (type(max_prompt_tokens) is not int or max_prompt_tokens < 1):
        raise ProcessorError(f"max_prompt_tokens must be a positive int, got {max_prompt_tokens!r}")
    if max_prompt_tokens is not None and (context_length is None or max_prompt_tokens < context_length):
        return max_prompt_tokens, (
            f"the prompt limit of {max_prompt_tokens} tokens (max_prompt_tokens: an engine's context less one token for the answer)"
        )
    return None if context_length is None else (context_length, f"the model's context of {context_length}")


def _download(repo_id: str, revision: str | None) -> Path:
    """The processor files of a hub repo, through huggingface_hub's cache (weights are not fetched)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=PROCESSOR_FILES))
    except Exception as e:  # offline, unknown repo, bad id: huggingface_hub raises many types
        raise ProcessorError(
            f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Offline? Pass the path of a downloaded checkpoint instead."
        ) from e
