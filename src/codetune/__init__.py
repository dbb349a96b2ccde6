"""codetune: QLoRA fine-tuning of small open LLMs into Python coders, scored by running their code."""

__version__ = "0.1.0"


def load(source, **recipe_overrides):
    """A run directory, merged model folder or hub id, ready to ``generate`` / ``chat``."""
    from .generate import load as _load

    return _load(source, **recipe_overrides)


__all__ = ["load", "__version__"]
