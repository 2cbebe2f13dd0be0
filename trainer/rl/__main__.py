"""`torchrun ... -m trainer.rl`: GRPO (the loop: trainer/rl/loop.py)."""

from trainer.rl.loop import main

main()
