"""Rollout engines: a step's prompts in, sampled completions and their log-probs out; weights in after each step.

One module per engine (DESIGN rule 13); the GRPO loop (trainer/rl.py) does not know which one runs.

    hf.py  in-process transformers.generate on a plain copy of the gathered weights (no dependency)
"""
