"""The pipeline on each new family's tiny builtin: prepare, train with packing, eval in the sandbox, generate, merge.

(The Phi-3 pipeline is covered by the other test modules on builtin:tiny-phi3.)
"""

import json

import pytest

from codetune.data import IGNORE_INDEX, load_split, prepare
from codetune.families import families
from codetune.recipe import load_recipe


@pytest.mark.parametrize("family_name", ["qwen2", "llama"])
def test_tiny_family_pipeline(family_name, tmp_path):
    import codetune
    from codetune.evaluate import evaluate
    from codetune.export import merge
    from codetune.generate import load_for_inference
    from codetune.train import train

    family = families()[family_name]
    recipe = load_recipe(
        "tiny-cpu",
        [
            f"model.name_or_path={family.builtin}",
            *family.recipe_overrides(),  # the tokenizer's own template, the family's pad and stop tokens
            "lora.target_modules=all-linear",
            "training.max_steps=6",
            "training.eval_steps=null",
            "training.save_strategy=no",
            "generation.max_new_tokens=24",
            "evaluation.compare_base=false",
        ],
    )
    run = tmp_path / "run"
    prepare(recipe, run, log=lambda *_: None)
    row = load_split(run, "train")[0]
    trained = [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
    from transformers import AutoTokenizer

    from codetune.model import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(family.builtin))
    # the family's end of turn is the last trained token: the model learns to stop there
    assert row["input_ids"][trained[-1]] == tok.convert_tokens_to_ids(family.turn_end)
    assert row["text"] == tok.apply_chat_template(row["messages"], tokenize=False)

    result = train(recipe, run)
    assert result.global_step == 6 and result.train_loss is not None
    assert (run / "adapter" / "adapter_config.json").is_file()

    evaluation = evaluate(run, ["starter"], recipe=load_recipe(run / "recipe.yaml"))
    starter = evaluation["results"]["fine-tuned"]["starter"]
    assert 0.0 <= starter["pass@1"] <= 1.0 and 0.0 <= starter["parse_rate"] <= 1.0

    answer = codetune.load(run).generate("Write a Python function is_even(n).")
    assert isinstance(answer, str)

    from codetune.card import render_card

    card = render_card(run)  # the chat-format section is the family's template, not Phi-3's
    assert tok.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
        tokenize=False,
        add_generation_prompt=True,
    ).rstrip("\n") in card
    assert "<|user|>" not in card and f"It ends its answer with `{family.stop_tokens[0]}`" in card

    merged = merge(run, log=lambda *_: None)
    config = json.loads((merged / "generation_config.json").read_text())
    stops = [tok.convert_tokens_to_ids(t) for t in family.stop_tokens]
    assert config["eos_token_id"] == stops
    # a merged folder is a model folder: it gets its family's settings, not Phi-3's
    loaded = load_for_inference(merged)
    assert loaded.recipe.generation.stop_tokens == list(family.stop_tokens)
    assert loaded.model.config.model_type == family_name
