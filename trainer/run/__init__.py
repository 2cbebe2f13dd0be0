"""A run's process and files.

    runtime.py     distributed init, timeouts and patient groups, seeding and RNG state, peak memory, atomic writes
    metrics.py     output_dir/metrics.jsonl, W&B, the progress bar
    checkpoint.py  complete-or-absent DCP checkpoints, resume rules, the HF export
"""
