"""SG-LoRA: semantic-guided LoRA parameter generation."""

__version__ = "0.9.32"
