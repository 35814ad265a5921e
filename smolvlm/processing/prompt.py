"""Prompt expansion: what each <image> and <video> placeholder becomes, token string by token string.

Reference: transformers' processing_smolvlm.py (`_prompt_split_image`, `_prompt_single_image`,
`SmolVLMProcessor.replace_video_token`) and `ProcessorMixin.get_text_with_replacements`
(processing_utils.py), REFERENCE.md section 5.

    split image (R x C):  for each row r, col c: <fake_token_around_image><row_r_col_c><image>*L
                          "\\n" after every row, then
                          "\\n<fake_token_around_image><global-img>" <image>*L <fake_token_around_image>
    unsplit image:        <fake_token_around_image><global-img><image>*L<fake_token_around_image>
    video:                "You are provided the following series of {n in words} frames from a
                          {H:MM:SS} [H:MM:SS] video.\\n", then per frame "\\nFrame from {MM:SS}:" +
                          the unsplit image string, then "\\n\\n"

The number of frames is written in words the way `num2words` does (English), without depending on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from smolvlm.processing.config import SpecialTokens

VIDEO_INTRO = "You are provided the following series of {frame_count} frames from a {video_duration} [H:MM:SS] video.\n"
FRAME_TIMESTAMP = "\nFrame from {timestamp}:"
MEDIA_OUTTRO = "\n\n"


def single_image_prompt(image_seq_len: int, tokens: SpecialTokens) -> str:
    return f"{tokens.fake_image}{tokens.global_image}{tokens.image * image_seq_len}{tokens.fake_image}"


def image_prompt(rows: int, cols: int, image_seq_len: int, tokens: SpecialTokens) -> str:
    if rows == 0 and cols == 0:
        return single_image_prompt(image_seq_len, tokens)
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += f"{tokens.fake_image}<row_{r + 1}_col_{c + 1}>{tokens.image * image_seq_len}"
        text += "\n"
    return text + "\n" + single_image_prompt(image_seq_len, tokens)


def video_prompt(
    timestamps: list[str], duration: str, image_seq_len: int, tokens: SpecialTokens
) -> str:
    text = VIDEO_INTRO.format(frame_count=number_to_words(len(timestamps)), video_duration=duration)
    frame = single_image_prompt(image_seq_len, tokens)
    for timestamp in timestamps:
        text += FRAME_TIMESTAMP.format(timestamp=timestamp) + frame
    return text + MEDIA_OUTTRO


def expand_placeholders(text: str, tokens: SpecialTokens, images: Iterator[str], videos: Iterator[str]) -> str:
    """Replace each <image> / <video> in order of appearance by the next expansion of its kind."""
    pattern = f"(?P<image>{re.escape(tokens.image)})|(?P<video>{re.escape(tokens.video)})"
    return re.sub(pattern, lambda m: next(images) if m.lastgroup == "image" else next(videos), text)


# ---------------------------------------------------------------------------------------------
# Numbers in words, English, as num2words 0.5 writes them ("one thousand, two hundred and one").
# ---------------------------------------------------------------------------------------------

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ["", "thousand", "million", "billion", "trillion"]


def _below_hundred(n: int) -> str:
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def _below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if hundreds == 0:
        return _below_hundred(rest)
    text = f"{_ONES[hundreds]} hundred"
    return text if rest == 0 else f"{text} and {_below_hundred(rest)}"


def number_to_words(n: int) -> str:
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 1000:
        return _below_thousand(n)
    groups = []  # (value, scale index), most significant first
    scale = 0
    while n > 0:
        n, group = divmod(n, 1000)
        groups.append((group, scale))
        scale += 1
    if scale > len(_SCALES):
        raise ValueError(f"number too large to write in words: {n}")
    groups = [(g, s) for g, s in reversed(groups) if g != 0]
    text = ""
    for i, (group, scale) in enumerate(groups):
        part = _below_thousand(group) + ("" if scale == 0 else " " + _SCALES[scale])
        if i == 0:
            text = part
        elif i == len(groups) - 1 and scale == 0 and group < 100:
            text += " and " + part
        else:
            text += ", " + part
    return text
