"""Glue between HF transformers models and the cp core (attention registration, mixer wrappers)."""
