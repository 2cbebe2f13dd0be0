"""SFT and GRPO trainers built on the cp core."""
