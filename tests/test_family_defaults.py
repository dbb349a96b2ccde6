"""Issue 22, points 1 and 2: the fields that depend on the model's family default to the family's values
(resolved into the run's recipe.yaml, shown with their origin by `recipe show`), a recipe that sets one
keeps it, and every token, template and LoRA-target check runs before data is prepared."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from codetune.cli import app
from codetune.errors import RecipeError
from codetune.families import families
from codetune.recipe import FAMILY_FIELDS, load_recipe, resolve_family

runner = CliRunner()


@pytest.mark.parametrize("name", ["phi3", "qwen2", "qwen3", "llama"])
def test_one_flag_swaps_the_family_and_its_defaults(name):
    fam = families()[name]
    recipe = load_recipe("tiny-cpu", [f"model.name_or_path={fam.builtin}"])
    assert recipe.tokenizer.chat_template == fam.chat_template
    assert recipe.tokenizer.pad_token == fam.pad_token
    assert recipe.generation.stop_tokens == list(fam.stop_tokens)
    assert recipe.lora.target_modules == fam.lora_modules("attention", "mlp")


def test_a_field_the_recipe_sets_keeps_its_value():
    recipe = load_recipe(
        "tiny-cpu",
        [
            "model.name_or_path=builtin:tiny-qwen2",
            "generation.stop_tokens=[<|im_end|>]",
            "lora.target_modules=all-linear",
        ],
    )
    assert recipe.generation.stop_tokens == ["<|im_end|>"] and recipe.lora.target_modules == "all-linear"
    assert recipe.tokenizer.pad_token == "<|endoftext|>"  # still the family's
    unresolved = load_recipe("tiny-cpu", ["model.name_or_path=builtin:tiny-qwen2"], resolve=False)
    assert {f for f in FAMILY_FIELDS} == set(resolve_family(unresolved)[1])
    assert resolve_family(unresolved)[1]["generation.stop_tokens"] == "qwen2"
    # the shipped hub recipes name their values, so that they read offline
    for shipped in ("phi3-mini-python", "phi3-mini-python-seed", "qwen2.5-coder-1.5b-python"):
        assert resolve_family(load_recipe(shipped, resolve=False))[1] == {}


def test_a_hub_model_whose_family_cannot_be_known_offline_is_one_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        RecipeError, match=r"model.name_or_path: cannot read the config of 'nobody/nothing-here'"
    ) as err:
        load_recipe("tiny-cpu", ["model.name_or_path=nobody/nothing-here"])
    assert "generation.stop_tokens" in str(err.value) and "set them in the recipe" in str(err.value)
    # naming the values makes it loadable (the model is then only needed when it is used)
    named = load_recipe(
        "tiny-cpu",
        [
            "model.name_or_path=nobody/nothing-here", "tokenizer.chat_template=null", "tokenizer.pad_token=null",
            "lora.target_modules=all-linear", "generation.stop_tokens=[]",
        ],
    )  # fmt: skip
    assert named.generation.stop_tokens == []


def test_recipe_show_keeps_family_and_says_what_it_resolves_to(tmp_path):
    res = runner.invoke(app, ["recipe", "show", "tiny-cpu", "--set", "model.name_or_path=builtin:tiny-llama"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    stop = next(line for line in lines if line.strip().startswith("stop_tokens:"))
    assert stop == '  stop_tokens: family  # llama family: ["<|eot_id|>", "<|end_of_text|>"]'
    template = next(line for line in lines if line.strip().startswith("chat_template:"))
    assert template.endswith("# llama family: null (the tokenizer's own)")
    # the file it prints still follows a model swap
    mine = tmp_path / "mine.yaml"
    mine.write_text(res.output)
    assert yaml.safe_load(mine.read_text())["generation"]["stop_tokens"] == "family"
    swapped = load_recipe(mine, ["model.name_or_path=builtin:tiny-qwen2"])
    assert swapped.generation.stop_tokens == ["<|im_end|>", "<|endoftext|>"]


def _train_fails_fast(tmp_path, *overrides: str) -> str:
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "tiny-cpu", "--run-dir", str(run), *sum((["--set", o] for o in overrides), [])])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and not run.exists(), res.output  # nothing prepared, nothing trained
    # the last line is the error (a first use builds the tiny model before, saying so)
    return res.output.strip().splitlines()[-1]


def test_a_stop_token_the_tokenizer_lacks_fails_before_any_work(tmp_path, codetune_home):
    out = _train_fails_fast(tmp_path, "model.name_or_path=builtin:tiny-qwen2", "generation.stop_tokens=[<|end|>]")
    assert out.startswith("error: generation.stop_tokens: '<|end|>' is not a single token"), out


def test_lora_targets_of_another_family_fail_before_any_work(tmp_path, codetune_home):
    out = _train_fails_fast(
        tmp_path,
        "model.name_or_path=builtin:tiny-qwen2",
        "lora.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]",
    )
    assert out.startswith("error: lora.target_modules: qkv_proj, gate_up_proj match no linear layer of qwen2"), out
    assert "family" in out and "q_proj" in out


def test_a_template_that_cannot_render_fails_before_any_work(tmp_path, codetune_home):
    template = json.dumps("{{ raise_exception('no answers here') }}")
    out = _train_fails_fast(tmp_path, f"tokenizer.chat_template={template}")
    assert out.startswith("error: tokenizer.chat_template cannot render a user turn and an answer: no answers here"), (
        out
    )


def test_the_seed_recipes_unmatched_targets_are_allowed_on_purpose_only():
    from codetune.families import phi3
    from codetune.model import count_trainable_lora_params

    seed = load_recipe("phi3-mini-python-seed")
    assert seed.lora.unmatched_targets == "allow"
    trainable, _ = count_trainable_lora_params(phi3.full_config(), seed.lora)
    assert trainable == 8_912_896  # o_proj and down_proj only, as the card's notebook logged
    strict = load_recipe("phi3-mini-python-seed", ["lora.unmatched_targets=error"])
    with pytest.raises(RecipeError, match="k_proj, q_proj, v_proj, gate_proj, up_proj match no linear layer of phi3"):
        count_trainable_lora_params(phi3.full_config(), strict.lora)
