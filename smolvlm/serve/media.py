"""OpenAI messages -> the processor's conversation format, with this server's rules for media.

- `image_url`: a `data:` URL (base64) or an http(s) URL (fetched by the processor within its
  deadline and size cap), or `file://` / a local path under `--allowed-local-media-path`.
- `video_url` (vLLM's extension): a `data:` URL, an http(s) URL (fetched here, 30 s and a size cap,
  as vLLM's video timeout), or `file://` / a local path under the allowed folder. Video decoders
  read files, so fetched and inline videos are written to a temporary file that `MediaFiles.close`
  deletes once the request's frames are decoded.
- Local paths are resolved (symlinks followed) before the folder check, so `../` and links cannot
  leave it; without the flag, no local file is read at all. Errors never say more about this
  machine's files than "cannot open" (the processor runs with `trusted=False`).
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from smolvlm.processing.image import fetch_url
from smolvlm.serve.protocol import BadRequest, ChatCompletionRequest

VIDEO_URL_TIMEOUT_S = 30.0
VIDEO_MAX_BYTES = 256 * 1024 * 1024
VIDEO_SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
                  "video/x-msvideo": ".avi", "video/mpeg": ".mpg"}


class MediaFiles:
    """Temporary files written for one request's videos; `close()` removes them."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def write(self, data: bytes, suffix: str) -> str:
        fd, path = tempfile.mkstemp(prefix="smolvlm-video-", suffix=suffix)
        self.paths.append(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def hide(self, message: str) -> str:
        """An error message with the temporary file names replaced (they mean nothing to a client)."""
        for path in self.paths:
            message = message.replace(path, "the video data")
        return message

    def close(self) -> None:
        for path in self.paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.paths.clear()


def to_conversation(request: ChatCompletionRequest, allowed_local: Path | None, files: MediaFiles) -> list[dict]:
    """The request's messages in the processor's format (`Processor.prepare`). Raises BadRequest."""
    conversation = []
    for m, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role  # OpenAI's newer name for system
        if isinstance(message.content, str):
            conversation.append({"role": role, "content": [{"type": "text", "text": message.content}]})
            continue
        content = []
        for p, part in enumerate(message.content):
            where = f"messages.{m}.content.{p}"
            if part.type == "text":
                content.append({"type": "text", "text": part.text})
            elif part.type == "image_url":
                content.append(_image(part.image_url.url, allowed_local, where))
            else:
                content.append(_video(part.video_url.url, allowed_local, files, where))
        if not content:
            raise BadRequest(f"messages.{m}.content is empty", param=f"messages.{m}.content")
        conversation.append({"role": role, "content": content})
    return conversation


def _image(url: str, allowed_local: Path | None, where: str) -> dict:
    scheme = _scheme(url)
    if scheme in ("data", "http", "https"):
        return {"type": "image", "url": url}
    if scheme in ("file", ""):
        return {"type": "image", "path": local_path(url, allowed_local, f"{where}.image_url.url")}
    raise BadRequest(f"{where}.image_url.url: unsupported URL scheme {scheme!r} (data:, http(s)://, file://)",
                     param=f"{where}.image_url.url")


def _video(url: str, allowed_local: Path | None, files: MediaFiles, where: str) -> dict:
    param = f"{where}.video_url.url"
    scheme = _scheme(url)
    if scheme == "data":
        header, _, payload = url.partition(",")
        if not _:
            raise BadRequest(f"{param}: a data: URL needs a ',' before its data", param=param)
        mime = header[5:].split(";")[0].lower()
        if ";base64" not in header.lower():
            raise BadRequest(f"{param}: a video data: URL must be base64 (data:video/mp4;base64,...)", param=param)
        if len(payload) > VIDEO_MAX_BYTES * 4 // 3 + 4:
            raise BadRequest(f"{param}: the video is larger than the {VIDEO_MAX_BYTES}-byte limit", param=param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{param}: invalid base64 video data", param=param) from None
        return {"type": "video", "path": files.write(data, VIDEO_SUFFIXES.get(mime, ".mp4"))}
    if scheme in ("http", "https"):
        from smolvlm.processing.errors import ProcessorError

        try:
            data = fetch_url(url, timeout_s=VIDEO_URL_TIMEOUT_S, max_bytes=VIDEO_MAX_BYTES)
        except ProcessorError as e:
            raise BadRequest(f"{param}: {e}", param=param) from None
        suffix = Path(urlparse(url).path).suffix.lower()
        return {"type": "video", "path": files.write(data, suffix if suffix in VIDEO_SUFFIXES.values() else ".mp4")}
    if scheme in ("file", ""):
        return {"type": "video", "path": local_path(url, allowed_local, param)}
    raise BadRequest(f"{param}: unsupported URL scheme {scheme!r} (data:, http(s)://, file://)", param=param)


def _scheme(url: str) -> str:
    head, sep, _ = url.partition(":")
    if not sep or "/" in head or len(head) == 1:  # "a/b.png", "/abs/x.png", "C:..." are paths
        return ""
    return head.lower()


def local_path(url: str, allowed_local: Path | None, param: str) -> str:
    """A `file://` URL or a path -> an absolute path inside the allowed folder, or BadRequest."""
    if allowed_local is None:
        raise BadRequest(f"{param}: local files are not served (start the server with --allowed-local-media-path DIR)",
                         param=param)
    if url.lower().startswith("file:"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise BadRequest(f"{param}: a file:// URL must not name a host", param=param)
        raw = unquote(parsed.path)
    else:
        raw = url
    path = Path(raw)
    if not path.is_absolute():
        path = allowed_local / path
    resolved = Path(os.path.realpath(path))
    if not resolved.is_relative_to(allowed_local):
        raise BadRequest(f"{param}: {raw[:200]!r} is outside the allowed media folder", param=param)
    return str(resolved)
