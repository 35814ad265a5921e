"""The byte-level BPE tokenizer, loaded from the checkpoint's tokenizer.json with `tokenizers`.

Mirrors what transformers' `TokenizersBackend` (tokenization_utils_tokenizers.py) does to the same
file so that ids are identical:
- named special tokens of tokenizer_config.json (bos/eos/unk/pad, extra_special_tokens) that the
  file lacks are added as special tokens;
- when tokenizer.json has no post-processor, or tokenizer_config.json says add_bos_token /
  add_eos_token, the post-processor is rebuilt from those two flags (SmolVLM2: neither, so nothing
  is added around a prompt);
- padding and truncation stored in tokenizer.json are switched off (we pad ourselves);
- decoding is `tokenizers`' decode; `clean_up_tokenization_spaces` is never applied to BPE
  tokenizers (transformers skips it for BPE as well).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer as BackendTokenizer, processors

from smolvlm.processing.config import read_json
from smolvlm.processing.errors import ProcessorError

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores a special token as a string or as an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


class Tokenizer:
    def __init__(self, backend: BackendTokenizer, config: dict[str, Any], source: str = "<memory>"):
        self.backend = backend
        self.source = source
        self.special_tokens_map: dict[str, str] = {}
        for name in NAMED_SPECIAL_TOKENS:
            text = _token_text(config.get(name))
            if text is not None:
                self.special_tokens_map[name] = text
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # transformers 5 also allows {name: token}
            extra = list(extra.values())
        extra_texts = [t for t in (_token_text(v) for v in extra) if t is not None]

        # Named and extra special tokens missing from tokenizer.json become special added tokens.
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in [*self.special_tokens_map.values(), *extra_texts] if t not in known]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

        add_bos = bool(config.get("add_bos_token", False))
        add_eos = bool(config.get("add_eos_token", False))
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            backend.post_processor = self._template_processing(add_bos, add_eos)
        backend.no_padding()
        backend.no_truncation()

        self.bos_token = self.special_tokens_map.get("bos_token")
        pad = self.special_tokens_map.get("pad_token")
        self.pad_token_id = None if pad is None else self.token_to_id(pad)

    def _template_processing(self, add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
        # transformers: TokenizersBackend.update_post_processor
        bos, eos = self.special_tokens_map.get("bos_token"), self.special_tokens_map.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = [(t, self.backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    @classmethod
    def from_directory(cls, directory: Path) -> Tokenizer:
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ProcessorError(f"{directory} has no tokenizer.json")
        try:
            backend = BackendTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ProcessorError(f"cannot read {path}: {e}") from e
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        return cls(backend, config, source=str(path))

    def token_to_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ProcessorError(f"token {token!r} is not in the vocabulary of {self.source}")
        return token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)
