"""codetune: QLoRA fine-tuning of small open LLMs into Python coders, scored by running their code."""

from .version import __version__


def load(source, **recipe_overrides):
    """A run directory, merged model folder or hub id, ready to ``generate`` / ``chat``."""
    from .generate import load as _load

    return _load(source, **recipe_overrides)


def run(recipe, run_dir=None, **overrides):
    """Run a recipe end to end (prepare, train, evaluate, card) in ``run_dir`` (default ``runs/<name>``).

    ``overrides`` set recipe fields, a double underscore for the dot: ``codetune.run("tiny-cpu",
    training__learning_rate=2e-4)``. Returns the ``pipeline.RunResult``."""
    from .pipeline import run as _run

    items = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return _run(recipe, run_dir, overrides=items)


__all__ = ["load", "run", "__version__"]
