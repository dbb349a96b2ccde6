import pytest
import yaml
from typer.testing import CliRunner

from codetune.cli import app
from codetune.recipe import Recipe, RecipeError, load_recipe, parse_override, shipped_recipes

runner = CliRunner()


def test_shipped_recipes_load_and_validate():
    names = shipped_recipes()
    assert set(names) == {
        "phi3-mini-python-seed", "phi3-mini-python", "qwen2.5-coder-1.5b-python", "qwen3-1.7b-python", "tiny-cpu",
        "tiny-cpu-rl",
    }  # fmt: skip
    for name in names:
        assert load_recipe(name).name == name


def test_tiny_cpu_rl_is_tiny_cpu_then_grpo():
    """Its description says the SFT half is tiny-cpu's knob for knob: only the suites (starter-fresh added) and rl differ."""
    sft, rl = load_recipe("tiny-cpu").model_dump(), load_recipe("tiny-cpu-rl").model_dump()
    assert rl["evaluation"].pop("suites") == [*sft["evaluation"].pop("suites"), "starter-fresh"]
    for recipe in (sft, rl):
        recipe.pop("name"), recipe.pop("description")
    assert sft.pop("rl") is None and rl.pop("rl")["tasks"] == "fresh"
    assert rl == sft


def test_seed_recipe_is_the_reference_run():
    r = load_recipe("phi3-mini-python-seed")
    assert r.model.name_or_path == "microsoft/Phi-3-mini-4k-instruct"
    assert (r.data.split.test_size, r.data.split.seed) == (0.05, 1234)
    assert (r.data.max_length, r.data.packing, r.data.loss_on, r.data.formatting) == (512, False, "all", "reference")
    assert r.tokenizer.chat_template == "phi3-2024-05" and r.tokenizer.pad_token == "<unk>"
    assert r.lora.target_modules == ["k_proj", "q_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert (r.lora.r, r.lora.alpha, r.lora.dropout) == (16, 16, 0.05)
    q = r.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (True, "nf4", True, "bfloat16")
    t = r.training
    assert (t.optimizer, t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.epochs) == (
        "paged_adamw_8bit",
        1e-4,
        "linear",
        0.1,
        3,
    )
    assert (t.batch_size, t.gradient_accumulation_steps, t.eval_steps, t.save_strategy, t.seed) == (
        4,
        8,
        100,
        "epoch",
        42,
    )
    g = r.generation
    assert (g.max_new_tokens, g.do_sample, g.temperature, g.top_k, g.top_p) == (256, True, 0.3, 50, 0.95)
    assert r.evaluation.samples == 500
    assert r.data.dedupe is False and r.data.decontaminate == []


def test_improved_recipe_fixes_the_known_faults():
    r = load_recipe("phi3-mini-python")
    assert r.lora.target_modules == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert r.data.loss_on == "answer" and r.data.packing and r.data.dedupe
    assert set(r.data.decontaminate) == {"test", "humaneval", "mbpp"}
    assert r.data.formatting == "clean" and r.tokenizer.pad_token != "<unk>"
    # the same test rows as the reference, so scores stay comparable
    assert r.data.split == load_recipe("phi3-mini-python-seed").data.split


@pytest.mark.parametrize(
    "item, path, value",
    [
        ("training.learning_rate=2e-4", ["training", "learning_rate"], 2e-4),
        ("data.packing=false", ["data", "packing"], False),
        ("lora.target_modules=[qkv_proj, o_proj]", ["lora", "target_modules"], ["qkv_proj", "o_proj"]),
        ("model.revision=null", ["model", "revision"], None),
        ("training.max_steps=30", ["training", "max_steps"], 30),
    ],
)
def test_parse_override_types(item, path, value):
    assert parse_override(item) == (path, value)


def test_overrides_apply_and_are_validated():
    r = load_recipe("tiny-cpu", ["training.learning_rate=2e-4", "lora.r=8", "data.split.seed=7"])
    assert (r.training.learning_rate, r.lora.r, r.data.split.seed) == (2e-4, 8, 7)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["training.learnin_rate=1"], "training.learnin_rate: unknown field; allowed here: optimizer, learning_rate"),
        (["lora.r=-1"], "lora.r: Input should be greater than 0"),
        (["data.packing=maybe"], "data.packing: Input should be a valid boolean"),
        (["data.loss_on=prompt"], "data.loss_on: Input should be 'all' or 'answer'"),
        (["training.epochs=0", "training.max_steps=-1"], "train for no steps"),
        (["evaluation.k=[1, 10]"], "k=[10] needs 0 < k <= n_samples"),
        (["lora.target_modules=[]"], "target_modules is empty"),
        (["quantization.load_in_4bit=false", "quantization.quant_storage=bfloat16"], "quant_storage only applies"),
        (["data.too_long=truncate"], 'data.packing with data.loss_on "answer" needs data.too_long'),
        (["training.save_strategy=steps", "training.save_steps=null"], 'save_strategy "steps" needs save_steps'),
        (["bogus=1"], "bogus: unknown field; allowed here: name, description, model"),
        (["data.max_length=5000"], "exceeds tokenizer.model_max_length"),
    ],
)
def test_bad_recipes_fail_naming_the_field(overrides, expected):
    with pytest.raises(RecipeError) as info:
        load_recipe("tiny-cpu", overrides)
    assert expected in str(info.value)


def test_unknown_recipe_and_malformed_set():
    with pytest.raises(RecipeError, match="unknown recipe 'nope': shipped recipes are"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="expected FIELD=VALUE"):
        load_recipe("tiny-cpu", ["training.learning_rate"])
    with pytest.raises(RecipeError, match="is a value, not a section"):
        load_recipe("tiny-cpu", ["training.seed.x=1"])


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    partial = tmp_path / "partial.yaml"
    partial.write_text("name: x\ndata: {source: starter}\n")
    with pytest.raises(RecipeError, match="model: required field is missing"):
        load_recipe(partial)


def test_cli_recipes_and_show_roundtrip(tmp_path):
    listed = runner.invoke(app, ["recipes"])
    assert listed.exit_code == 0
    for name in shipped_recipes():
        assert name in listed.output
    shown = runner.invoke(app, ["recipe", "show", "phi3-mini-python", "--set", "training.learning_rate=3e-4"])
    assert shown.exit_code == 0, shown.output
    resolved = Recipe.model_validate(yaml.safe_load(shown.stdout))
    assert resolved.training.learning_rate == 3e-4
    # the printed recipe is complete: saved and loaded back, it is the same recipe
    path = tmp_path / "r.yaml"
    path.write_text(shown.stdout)
    assert load_recipe(path) == resolved


def test_codetune_set_shortens_grpo_where_a_recipe_has_it_and_never_adds_the_stage(monkeypatch):
    monkeypatch.setenv("CODETUNE_SET", "training.max_steps=3 rl.max_steps=2")

    def shown(*args):
        res = runner.invoke(app, ["recipe", "show", *args])
        assert res.exit_code == 0, res.output
        return Recipe.model_validate(yaml.safe_load(res.stdout))

    plain = shown("tiny-cpu")
    assert plain.training.max_steps == 3 and plain.rl is None  # a quick setting adds no GRPO stage
    assert shown("tiny-cpu-rl").rl.max_steps == 2
    added = shown("tiny-cpu", "--set", "rl.tasks=fresh")  # the command's own --set adds it: then it is shortened
    assert added.rl.tasks == "fresh" and added.rl.max_steps == 2


def test_cli_bad_override_exits_2_with_the_field():
    res = runner.invoke(app, ["recipe", "show", "tiny-cpu", "--set", "training.batch_size=zero"])
    assert res.exit_code == 2
    assert "training.batch_size" in res.output and "valid integer" in res.output
