"""codetune: QLoRA fine-tuning of small open LLMs into Python coders, scored by running their code."""

__version__ = "0.1.0"
