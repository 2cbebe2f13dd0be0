"""Tiny random-init models, built from configs alone (no hub download).

    builders.py        the supported families' tiny configs: trainer's tiny:<family>, tests, demos, benchmarks
    family_configs.py  a tiny config of every causal-LM family transformers ships (the family sweep)
"""

from models.tiny.builders import TINY_BUILDERS, TINY_FAMILIES, tiny_config, tiny_model

__all__ = ["TINY_BUILDERS", "TINY_FAMILIES", "tiny_config", "tiny_model"]
