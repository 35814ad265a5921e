"""Preprocessing: conversations (text, images, videos) -> input_ids, pixel_values, pixel_attention_mask.

Read in this order: processor.py (the pipeline), chat_template.py, image.py, video.py, prompt.py,
pixels.py, tokenizer.py, config.py (which checkpoint file provides what), errors.py.
"""

from smolvlm.processing.errors import ProcessorError
from smolvlm.processing.processor import LabelledConversation, MediaItem, ProcessedConversation, Processor

__all__ = ["Processor", "ProcessorError", "ProcessedConversation", "LabelledConversation", "MediaItem"]
