"""OpenAI messages -> the processor's conversation format, with this server's rules for media.

- `image_url`: a `data:` URL (base64) or an http(s) URL (fetched by the processor within its
  deadline and size cap), or `file://` / a local path under `--allowed-local-media-path`.
- `video_url` (vLLM's extension): a `data:` URL, an http(s) URL (fetched here, 30 s and a size cap,
  as vLLM's video timeout), or `file://` / a local path under the allowed folder. Video decoders
  read files, so fetched and inline videos are written to a temporary file that `MediaFiles.close`
  deletes once the request's frames are decoded.
- Local paths are resolved (symlinks followed) before the folder check, so `../` and links cannot
  leave it; without the flag, no local file is read at all. Errors never say more about this
  machine's files than "cannot open" (the processor runs with `trusted=False`), and name the file
  as the client wrote it, not its resolved path.
- http(s) URLs may name any host unless `--allowed-media-domains` lists the ones allowed (a server
  reachable by untrusted clients should set it: the server fetches what they name, internal
  addresses included). At most `--max-media-per-request` images and videos per request.
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
    """Temporary files written for one request's videos (`close()` removes them), and the names
    error messages must show for them and for resolved local paths."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.aliases: dict[str, str] = {}  # resolved local path -> the client's own string

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
        for path, given in sorted(self.aliases.items(), key=lambda item: -len(item[0])):
            message = message.replace(path, given)
        return message

    def close(self) -> None:
        for path in self.paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.paths.clear()


def to_conversation(request: ChatCompletionRequest, config, files: MediaFiles) -> list[dict]:
    """The request's messages in the processor's format (`Processor.prepare`), under `config`'s
    (app.ServerConfig) media rules. Raises BadRequest."""
    count = sum(1 for m in request.messages if not isinstance(m.content, str) for p in m.content if p.type != "text")
    if count > config.max_media_per_request:
        raise BadRequest(f"the request has {count} images and videos, more than this server's limit of "
                         f"{config.max_media_per_request}", param="messages")
    rules = _Rules(config.allowed_local_media_path, config.allowed_media_domains, files)
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
                content.append(_image(part.image_url.url, rules, where))
            else:
                content.append(_video(part.video_url.url, rules, where))
        if not content:
            raise BadRequest(f"messages.{m}.content is empty", param=f"messages.{m}.content")
        conversation.append({"role": role, "content": content})
    return conversation


class _Rules:
    def __init__(self, allowed_local: Path | None, domains: tuple[str, ...] | None, files: MediaFiles):
        self.allowed_local = allowed_local
        self.domains = None if domains is None else {d.lower().rstrip(".") for d in domains}
        self.files = files

    def check_host(self, url: str, param: str) -> None:
        if self.domains is None:
            return
        host = (urlparse(url).hostname or "").rstrip(".")
        if host not in self.domains:
            raise BadRequest(f"{param}: {host!r} is not among this server's allowed media domains", param=param)

    def local(self, url: str, param: str) -> str:
        path = local_path(url, self.allowed_local, param)
        self.files.aliases[path] = url[:200]
        return path


def _image(url: str, rules: _Rules, where: str) -> dict:
    param = f"{where}.image_url.url"
    scheme = _scheme(url)
    if scheme in ("data", "http", "https"):
        if scheme != "data":
            rules.check_host(url, param)
        return {"type": "image", "url": scheme + url[len(scheme):]}  # DATA:, HTTPS: as data:, https:
    if scheme in ("file", ""):
        return {"type": "image", "path": rules.local(url, param)}
    raise BadRequest(f"{where}.image_url.url: unsupported URL scheme {scheme!r} (data:, http(s)://, file://)",
                     param=f"{where}.image_url.url")


def _video(url: str, rules: _Rules, where: str) -> dict:
    param = f"{where}.video_url.url"
    files = rules.files
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

        rules.check_host(url, param)
        try:
            data = fetch_url(url, timeout_s=VIDEO_URL_TIMEOUT_S, max_bytes=VIDEO_MAX_BYTES)
        except ProcessorError as e:
            raise BadRequest(f"{param}: {e}", param=param) from None
        suffix = Path(urlparse(url).path).suffix.lower()
        return {"type": "video", "path": files.write(data, suffix if suffix in VIDEO_SUFFIXES.values() else ".mp4")}
    if scheme in ("file", ""):
        return {"type": "video", "path": rules.local(url, param)}
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
    try:
        path = Path(raw)
        if not path.is_absolute():
            path = allowed_local / path
        resolved = Path(os.path.realpath(path))
        str(resolved).encode("utf-8")
    except (ValueError, UnicodeError):  # a NUL byte, a lone surrogate: no such file can exist
        raise BadRequest(f"{param}: not a valid file path", param=param) from None
    if not resolved.is_relative_to(allowed_local):
        raise BadRequest(f"{param}: {raw[:200]!r} is outside the allowed media folder", param=param)
    return str(resolved)
