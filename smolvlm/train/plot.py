"""The loss curve as a PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 720, 420, 60


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = 10 ** math.floor(math.log10((high - low) / count))
    for multiple in (1, 2, 5, 10):
        if (high - low) / (step * multiple) <= count:
            step *= multiple
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def loss_curve(train: list[tuple[int, float]], evaluation: list[tuple[int, float]], path: str | Path, title: str) -> Path:
    """Training loss per step (blue line) and evaluation loss (orange dots) -> PNG at `path`."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    points = train + evaluation
    if not points:
        draw.text((MARGIN, HEIGHT // 2), "no steps were run", fill="black")
        image.save(path)
        return Path(path)
    x_low, x_high = 0, max(max(s for s, _ in points), 1)
    y_values = [v for _, v in points if math.isfinite(v)] or [0.0]
    y_low, y_high = min(0.0, min(y_values)), max(y_values) * 1.05 or 1.0
    left, top, right, bottom = MARGIN, 30, WIDTH - 20, HEIGHT - MARGIN

    def at(step: float, value: float) -> tuple[float, float]:
        x = left + (step - x_low) / (x_high - x_low) * (right - left)
        y = bottom - (value - y_low) / (y_high - y_low) * (bottom - top)
        return x, y

    draw.rectangle([left, top, right, bottom], outline="black")
    for value in _ticks(y_low, y_high):
        _, y = at(0, value)
        draw.line([left - 4, y, left, y], fill="black")
        draw.line([left, y, right, y], fill=(230, 230, 230))
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
    for step in _ticks(x_low, x_high):
        x, _ = at(step, y_low)
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - 8, bottom + 8), f"{step:g}", fill="black")
    draw.text((left, 8), title, fill="black")
    draw.text(((left + right) // 2 - 12, bottom + 26), "step", fill="black")
    line = [at(s, v) for s, v in train if math.isfinite(v)]
    if len(line) > 1:
        draw.line(line, fill=(31, 119, 180), width=2)
    elif line:
        x, y = line[0]
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    for s, v in evaluation:
        if math.isfinite(v):
            x, y = at(s, v)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(255, 127, 14))
    draw.line([right - 150, top + 14, right - 130, top + 14], fill=(31, 119, 180), width=2)
    draw.text((right - 125, top + 8), "train loss", fill="black")
    if evaluation:
        draw.ellipse([right - 144, top + 28, right - 136, top + 36], fill=(255, 127, 14))
        draw.text((right - 125, top + 26), "eval loss", fill="black")
    image.save(path)
    return Path(path)
