"""Fine-tuning: LoRA (PEFT's names and files), labelled JSONL conversations, the training loop.

Read in this order: train.py (the loop, top to bottom), data.py (JSONL -> batches), loss.py (the
objective), lora.py (the adapter module, merging, PEFT files), checkpoint.py (model directories,
training state), plot.py (the loss curve).
"""

from smolvlm.train.lora import AdapterError, LoraConfig, add_lora, load_adapter, merge_lora, save_adapter

__all__ = ["AdapterError", "LoraConfig", "add_lora", "load_adapter", "merge_lora", "save_adapter"]
