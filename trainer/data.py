"""The trainers' data modules (one job each), and the one name trainer/modeling.py imports from here.

    trainer/tokenizer.py   which tokenizer, loading it, pad id, the startup check against the model
    trainer/records.py     rows from builtin / .jsonl / .json / .parquet / HF datasets -> chat messages
    trainer/chat.py        chat template -> token ids + assistant loss mask; shifted labels
    trainer/packing.py     next-fit packing into rows of seq_len (SFT and GRPO), PackedLoader, ShuffledCursor
    trainer/prompts.py     RL prompts (built-in tasks, a user dataset, held-out eval), PromptSampler
"""

from trainer.tokenizer import TINY_MODEL_PREFIX

__all__ = ["TINY_MODEL_PREFIX"]
