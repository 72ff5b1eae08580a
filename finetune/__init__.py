"""finetune: measure a small image dataset, pick what to fine-tune, and train it with Lightning."""

__version__ = "0.1.0"
