"""Data for both trainers: which tokenizer, where rows come from, chat templates, packing into rows.

    tokenizer.py  the tokenizer (builtin byte-level BPE for tiny:*, else the model's own), pad id, fits-model check
    records.py    jsonl / json / parquet / HF dataset rows -> chat messages; the bundled assets/
    chat.py       chat template, assistant-only loss mask, shifted labels
    packing.py    next-fit rows (SFT documents and GRPO rollouts), the resumable PackedLoader
"""
