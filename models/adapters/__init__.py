"""Parameter-efficient adapters on CP models: lora.py (peft's LoRA, exact under every CP style)."""
