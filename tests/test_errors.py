"""One error hierarchy, and recipes that refuse nonsense (issue 11's Validation section)."""

from __future__ import annotations

import pytest

from codetune.data import DataError
from codetune.errors import CodetuneError
from codetune.evaluate import Task
from codetune.recipe import OPTIMIZERS, SCHEDULERS, RecipeError, check_integrations, load_recipe
from codetune.suites import program_parses
from codetune.train import NonFiniteLossError


def test_every_user_facing_error_is_a_codetune_error():
    for cls in (RecipeError, DataError, NonFiniteLossError):
        assert issubclass(cls, CodetuneError)
    from codetune.gguf_export import GGUFExportError

    assert issubclass(GGUFExportError, CodetuneError)


def test_optimizer_and_scheduler_names_are_transformers_own():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}
    assert set(SCHEDULERS) == {s.value for s in SchedulerType}


@pytest.mark.parametrize(
    "setting,message",
    [
        ("training.learning_rate=.inf", "training.learning_rate: Input should be a finite number"),
        ("training.epochs=.nan", "training.epochs: Input should be a finite number"),
        ("lora.r=100000", "lora.r: Input should be less than or equal to 1024"),
        ("training.batch_size=true", "training.batch_size: Input should be a valid integer"),
        ("training.epochs='3'", "training.epochs: Input should be a valid number"),
        ("name=../../etc", "name: must be a plain file name"),
        ("name=a/b", "name: must be a plain file name"),
        ("name=..", "name: must be a plain file name"),
        ("generation.seed=18446744073709551616", "generation.seed: Input should be less than or equal to 4294967295"),
        ("generation.seed=-1", "generation.seed: Input should be greater than or equal to 0"),
        ("training.optimizer=adamw_tourch", "training.optimizer: Input should be 'adamw_torch'"),
        ("training.lr_scheduler=cosin", "training.lr_scheduler: Input should be 'linear'"),
    ],
)
def test_recipes_refuse_nonsense_in_one_line(setting, message):
    with pytest.raises(RecipeError) as info:
        load_recipe("tiny-cpu", [setting])
    text = str(info.value)
    assert message in text and "\n" not in text  # one problem, one line


def test_the_shipped_recipes_still_load():
    for name in ("tiny-cpu", "phi3-mini-python", "phi3-mini-python-seed"):
        assert load_recipe(name).name == name
    assert load_recipe("tiny-cpu", ["training.epochs=2"]).training.epochs == 2.0  # an int is a fine float


def test_report_to_names_installed_integrations(monkeypatch):
    import importlib.util

    recipe = load_recipe("tiny-cpu", ["training.report_to=[wandb]"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RecipeError, match="training.report_to: wandb is not installed"):
        check_integrations(recipe)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    check_integrations(recipe)


def test_parse_rate_parses_humaneval_bodies_the_way_they_run():
    task = Task(
        suite="humaneval",
        task_id="t",
        prompt=[],
        entry_point="add",
        preamble='def add(a, b):\n    """Add."""\n',
    )
    assert program_parses(task, "    return a + b\n")  # a bare body: parses after the prompt
    assert program_parses(task, "def add(a, b):\n    return a + b\n")  # a whole function
    assert not program_parses(task, "    # nothing\n")  # adds no statement
    assert not program_parses(task, "")
    assert not program_parses(task, "    return (\n")
    assert not program_parses(task, "    return " + "+".join(["1"] * 3000) + "\n")  # RecursionError in ast
    assert not program_parses(task, "    return " + "-" * 7000 + "1\n")  # MemoryError in the parser
