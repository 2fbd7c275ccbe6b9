"""fedtune: a Hydra experiment runner for federated fine-tuning of language models."""

__version__ = "0.1.0"
