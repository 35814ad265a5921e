"""The one exception type the processor raises for bad inputs and bad checkpoint files.

Users catch `ProcessorError` (a `ValueError`, so code that already catches `ValueError` keeps
working); the message always names the offending input: the file path, the content item, the
conversation index, or the checkpoint file.
"""


class ProcessorError(ValueError):
    """A conversation, media item or processor file that cannot be turned into model inputs."""


def require_file(path, what: str):
    """`path` as a Path if it names a readable-looking file, else ProcessorError: "{what} file not
    found", or "cannot read" for a name the OS refuses (too long, a NUL byte)."""
    from pathlib import Path

    path = Path(path)
    try:
        found = path.is_file()
    except (OSError, ValueError) as e:
        raise ProcessorError(f"cannot read {what} file {str(path)[:200]!r}: {e}") from None
    if not found:
        raise ProcessorError(f"{what} file not found: {str(path)[:300]}")
    return path
