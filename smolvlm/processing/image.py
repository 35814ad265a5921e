"""Images: load any supported source to RGB, then resize and cut into tiles, all with Pillow.

Reference: transformers' `SmolVLMImageProcessorPil` (models/smolvlm/image_processing_pil_smolvlm.py)
and `load_image` / `convert_to_rgb` (image_utils.py, image_transforms.py). Every resize there goes
uint8 numpy -> PIL -> `Image.resize(..., LANCZOS)` -> uint8 numpy, so working on PIL images
throughout gives the same bytes. Pipeline for one image (REFERENCE.md section 5):

    RGB  ->  resize so the longest edge is `longest_edge` (2048), aspect kept, short side even
         ->  resize up to multiples of `tile_size` (512)           [splitting on]
         ->  R x C tiles, row-major, + the whole image at tile_size² as the global tile, last
    or   ->  one tile_size² tile, R = C = 0                         [splitting off]

Tiles leave this file as uint8 (3, H, W); normalisation to float happens in `pixels.py`.
"""

from __future__ import annotations

import base64
import http.client
import io
import math
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from smolvlm.processing.config import MAX_IMAGE_SIZE, ImageSettings
from smolvlm.processing.errors import ProcessorError, require_file

URL_TIMEOUT_S = 20.0  # the whole download (connect, headers, body), not each socket read
URL_MAX_BYTES = 64 * 1024 * 1024  # refuse downloads larger than this
FILE_MAX_BYTES = 64 * 1024 * 1024  # and local image files larger than this


@dataclass
class ImageTiles:
    tiles: np.ndarray  # (N, 3, tile, tile) uint8; N = rows * cols + 1 when split, else 1
    rows: int  # 0 when the image was not split
    cols: int


# ---------------------------------------------------------------------------------------------
# Loading: every source ends as an RGB PIL image.
# ---------------------------------------------------------------------------------------------


class OpenedImage:
    """An image source opened as far as its size, not decoded: the tile grid (and so the prompt's
    token count) is known before any pixel is made. `rgb()` decodes it."""

    def __init__(self, source: Image.Image | np.ndarray, name: str, from_file: bool):
        self.source = source  # a lazily opened PIL image (header read), a PIL image given, or a uint8 array
        self.name = name
        self.from_file = from_file  # bytes from a file, URL or base64: transformers' load_image path
        self.opaque = False  # an untrusted caller's local file: every failure reads "cannot open"

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) as the model will see it (EXIF orientation applied to files)."""
        if isinstance(self.source, np.ndarray):
            return _array_hw(self.source)
        width, height = self.source.size
        if self.from_file and _exif_orientation(self.source) in (5, 6, 7, 8):  # a quarter turn
            width, height = height, width
        return height, width

    def rgb(self) -> Image.Image:
        try:
            return self._rgb()
        except ProcessorError:
            if not self.opaque:
                raise
            raise ProcessorError(f"cannot open image file {self.name[:200]!r}") from None

    def _rgb(self) -> Image.Image:
        if isinstance(self.source, np.ndarray):
            return _rgb_from_array(self.source)
        if not self.from_file:
            try:
                return _rgb_from_pil(self.source)
            except (OSError, ValueError) as e:  # a lazily opened file that is truncated, a closed image
                raise ProcessorError(f"the PIL image cannot be read: {e}") from e
        try:
            image = self.source
            image.load()  # decode now so truncated files fail here, with the name attached
            image = ImageOps.exif_transpose(image)  # transformers' load_image: orientation, then RGB
            return image.convert("RGB")
        except Image.DecompressionBombError as e:
            raise ProcessorError(f"{self.name} is too large to decode safely: {e}") from e
        except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncated or corrupt data this way
            raise ProcessorError(f"{self.name} is corrupt or truncated: {e}") from e


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation known without decoding the pixels (1 when none is known yet)."""
    try:
        if image.format == "PNG":  # PngImageFile.getexif() decodes the image to find a late eXIf chunk
            raw = image.info.get("exif")
            if not raw:
                return 1  # a late chunk is seen when decoded, and the prompt is recomputed then
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(0x0112, 1))
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block: `rgb()` decides, the size is a first guess
        return 1


def _open_bytes(data: bytes, name: str) -> OpenedImage:
    """Read the header only (format, size, EXIF); the pixels are decoded by `OpenedImage.rgb`."""
    try:
        return OpenedImage(Image.open(io.BytesIO(data)), name, from_file=True)
    except UnidentifiedImageError as e:
        raise ProcessorError(f"{name} is not a readable image file") from e
    except Image.DecompressionBombError as e:
        raise ProcessorError(f"{name} is too large to decode safely: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ProcessorError(f"{name} is corrupt or truncated: {e}") from e


def _read_path(path: str | Path, max_bytes: int | None = None) -> bytes:
    path = require_file(path, "image")
    max_bytes = FILE_MAX_BYTES if max_bytes is None else max_bytes
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ProcessorError(f"image file {path} is {size} bytes, more than the {max_bytes}-byte limit")
        return path.read_bytes()
    except OSError as e:  # permissions, a file removed meanwhile
        raise ProcessorError(f"cannot read image file {path}: {e.strerror or e}") from e


def fetch_url(url: str, timeout_s: float | None = None, max_bytes: int | None = None) -> bytes:
    """GET an http(s) URL within a total deadline (`URL_TIMEOUT_S`) and a size cap (`URL_MAX_BYTES`).

    The deadline covers the whole download: a server that drips a byte now and then is cut off.
    Each socket wait is bounded by the deadline too, so the worst case is about twice it."""
    timeout_s = URL_TIMEOUT_S if timeout_s is None else timeout_s
    max_bytes = URL_MAX_BYTES if max_bytes is None else max_bytes
    deadline = time.monotonic() + timeout_s
    chunks, size = [], 0
    try:
        with _OPENER.open(url, timeout=timeout_s) as response:
            while True:
                if time.monotonic() > deadline:
                    raise ProcessorError(f"cannot fetch {url}: not done within {timeout_s:g} s")
                chunk = response.read1(1 << 16)  # what has arrived (at least a byte), or b"" at the end
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ProcessorError(f"{url} is larger than the {max_bytes}-byte limit")
    except ProcessorError:
        raise
    except OSError as e:  # URLError, HTTPError, socket timeouts are all OSError
        raise ProcessorError(f"cannot fetch {url[:200]}: {e}") from e
    except (ValueError, UnicodeError, http.client.HTTPException) as e:  # a malformed URL (bad port, IPv6, control characters)
        raise ProcessorError(f"cannot fetch {url[:200]!r}: not a valid URL ({type(e).__name__}: {e})") from None
    return b"".join(chunks)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only: a server must not send us to ftp:// or file://."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise ProcessorError(f"cannot fetch {req.full_url[:200]}: it redirects to {newurl[:200]!r}, not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# http(s) only: no ftp/file handlers at all, and redirects checked
_OPENER = urllib.request.OpenerDirector()
for _handler in (urllib.request.HTTPHandler, urllib.request.HTTPSHandler, _HttpOnlyRedirects,
                 urllib.request.HTTPDefaultErrorHandler, urllib.request.HTTPErrorProcessor):
    _OPENER.add_handler(_handler())


def _decode_data_uri(uri: str) -> bytes:
    if uri.startswith("data:") and "," not in uri:
        raise ProcessorError(f"a data: URI needs a ',' before its data ({uri[:40]!r}...)")
    payload = uri.split(",", 1)[1] if uri.startswith("data:") else uri
    if len(payload) > URL_MAX_BYTES * 4 // 3 + 4:  # base64: 4 characters per 3 bytes
        raise ProcessorError(f"base64 image data is larger than the {URL_MAX_BYTES}-byte limit")
    try:
        return base64.b64decode(payload, validate=False)
    except ValueError as e:
        raise ProcessorError(f"invalid base64 image data ({uri[:40]}...)") from e


def _rgb_from_pil(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb` for PIL inputs: transparency is composited onto white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _channels_last(array: np.ndarray) -> np.ndarray:
    """transformers' `convert_to_rgb` input rule for uint8 numpy images: (H, W), (H, W, C) or
    (C, H, W), C in 1, 3, 4 -> (H, W, C)."""
    if array.dtype != np.uint8:
        raise ProcessorError(f"numpy images must be uint8 in [0, 255], got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim != 3:
        raise ProcessorError(f"numpy images must have 2 or 3 dimensions, got shape {array.shape}")
    elif array.shape[0] in (1, 3, 4):  # channel-first wins ties, as transformers infers it
        array = array.transpose(1, 2, 0)
    elif array.shape[2] not in (1, 3, 4):
        raise ProcessorError(f"numpy image has no channel axis of size 1, 3 or 4: shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ProcessorError(f"numpy image is empty: shape {array.shape}")
    if array.shape[0] * array.shape[1] > (Image.MAX_IMAGE_PIXELS or 1 << 62):  # PIL's decompression-bomb bound
        raise ProcessorError(f"numpy image of {array.shape[0]}x{array.shape[1]} pixels is larger than {Image.MAX_IMAGE_PIXELS}")
    return array


def _array_hw(array: np.ndarray) -> tuple[int, int]:
    height, width, _ = _channels_last(array).shape
    return height, width


def _rgb_from_array(array: np.ndarray) -> Image.Image:
    array = _channels_last(array)
    channels = array.shape[2]
    if channels == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 4:
        alpha = array[..., 3:4] / 255  # float64, as in transformers
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def open_image(item: dict[str, Any], trusted: bool = True) -> OpenedImage:
    """One {"type": "image", ...} content item, opened as far as its size (see `OpenedImage`).

    Accepted keys (the first present wins): "image" (PIL image, uint8 numpy array, bytes, or a
    path / URL string), "url" (http, https or data URI only: a service forwarding user content must
    not have it read local files), "path", "base64". With `trusted=False` (a caller who must not
    learn about this machine's files) every failure to read a local file gives the same message:
    a missing file and an unreadable one look alike.
    """
    for key in ("image", "url", "path", "base64"):
        if key in item:
            source = item[key]
            break
    else:
        raise ProcessorError(f"image item has none of the keys image/url/path/base64: {sorted(item)}")

    if isinstance(source, Image.Image):
        if source.width == 0 or source.height == 0:
            raise ProcessorError(f"PIL image is empty: size {source.size}")
        if source.width * source.height > (Image.MAX_IMAGE_PIXELS or 1 << 62):
            raise ProcessorError(f"PIL image of {source.size} pixels is larger than {Image.MAX_IMAGE_PIXELS}")
        return OpenedImage(source, "PIL image", from_file=False)
    if isinstance(source, np.ndarray):
        _channels_last(source)  # checked now, converted by rgb()
        return OpenedImage(source, "numpy image", from_file=False)
    if isinstance(source, (bytes, bytearray)):
        return _open_bytes(bytes(source), f"image bytes ({len(source)} bytes)")
    if isinstance(source, str) and (key == "base64" or source.startswith("data:")):
        return _open_bytes(_decode_data_uri(source), "base64 image")
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return _open_bytes(fetch_url(source), source)
    if isinstance(source, str) and key == "url":
        raise ProcessorError(f"an image 'url' must be http(s):// or data:, got {source[:80]!r}; pass a local file as 'path'")
    if isinstance(source, (str, Path)):
        return _open_local(source, trusted)
    raise ProcessorError(f"unsupported image source of type {type(source).__name__} under key {key!r}")


def _open_local(path: str | Path, trusted: bool) -> OpenedImage:
    if trusted:
        return _open_bytes(_read_path(path), str(path))
    try:
        opened = _open_bytes(_read_path(path), str(path))
    except ProcessorError:
        raise ProcessorError(f"cannot open image file {str(path)[:200]!r}") from None
    opened.opaque = True
    return opened


def load_image(item: dict[str, Any], trusted: bool = True) -> Image.Image:
    """An RGB PIL image from one content item (`open_image`, then decoded)."""
    return open_image(item, trusted).rgb()


# ---------------------------------------------------------------------------------------------
# Sizes: transformers' helper functions, same arithmetic (int() truncation, even bump, 4096 cap).
# ---------------------------------------------------------------------------------------------


def resize_to_longest_edge(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """`_resize_output_size_rescale_to_max_len` then `_resize_output_size_scale_below_upper_bound`."""
    aspect_ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect_ratio)
        height += height % 2  # bumped to even
    else:
        height = longest_edge
        width = int(height * aspect_ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)

    aspect_ratio = width / height  # cap the longest edge at 4096
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect_ratio)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect_ratio)
    return max(height, 1), max(width, 1)


def resize_to_tile_multiple(height: int, width: int, tile: int) -> tuple[int, int]:
    """`resize_for_vision_encoder`: the long side rounds up to a multiple of `tile`, the short side
    is derived from the new long side, truncated, then rounded up too."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    return height, width


def _resize(image: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    return image.resize((width, height), resample=resample)


def _chw(image: Image.Image) -> np.ndarray:
    return np.array(image).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W), a writable copy


def tile_grid(height: int, width: int, settings: ImageSettings) -> tuple[int, int]:
    """(rows, cols) of the split an image of this size gets, (0, 0) when unsplit: the arithmetic
    of `split_image` without pixels, so a prompt's length is known before any image is decoded."""
    height, width = resize_to_longest_edge(height, width, settings.longest_edge)
    if not settings.do_image_splitting:
        return 0, 0
    tile = settings.tile_size
    height, width = resize_to_tile_multiple(height, width, tile)
    if height <= tile and width <= tile:
        return 0, 0
    return (height - tile) // tile + 1, (width - tile) // tile + 1


def split_image(image: Image.Image, settings: ImageSettings) -> ImageTiles:
    """Resize and cut one RGB image into tiles (`SmolVLMImageProcessorPil._preprocess` for one image)."""
    tile, resample = settings.tile_size, settings.resample
    rows, cols = tile_grid(image.height, image.width, settings)
    height, width = resize_to_longest_edge(image.height, image.width, settings.longest_edge)
    image = _resize(image, height, width, resample)

    if not settings.do_image_splitting:
        return ImageTiles(tiles=_chw(_resize(image, tile, tile, resample))[None], rows=0, cols=0)

    height, width = resize_to_tile_multiple(height, width, tile)
    image = _resize(image, height, width, resample)
    if rows == 0:
        return ImageTiles(tiles=_chw(image)[None], rows=0, cols=0)

    pixels = _chw(image)  # (3, rows * tile, cols * tile)
    tiles = [pixels[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows) for c in range(cols)]
    tiles.append(_chw(_resize(image, tile, tile, resample)))  # the global view, last
    return ImageTiles(tiles=np.stack(tiles), rows=rows, cols=cols)
