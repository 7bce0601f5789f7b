"""SG-LoRA: semantic-guided LoRA parameter generation."""

__version__ = "0.8.0"
