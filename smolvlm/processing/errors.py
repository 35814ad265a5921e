"""The one exception type the processor raises for bad inputs and bad checkpoint files.

Users catch `ProcessorError` (a `ValueError`, so code that already catches `ValueError` keeps
working); the message always names the offending input: the file path, the content item, the
conversation index, or the checkpoint file.
"""


class ProcessorError(ValueError):
    """A conversation, media item or processor file that cannot be turned into model inputs."""
