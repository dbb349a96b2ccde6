"""The whole pipeline on every model family's tiny builtin, and on an architecture no family claims.

Each test takes ``family_run`` (tests/conftest.py): one run per family with a builtin tiny model, trained once
per session with the family's own template, pad and stop tokens. A family file added to
src/codetune/families joins every test here without a line changed. The Phi-3-specific pipeline tests
(test_train, test_inference, test_serve, test_ship, ...) stay as they are, on builtin:tiny-phi3.
"""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from codetune.cli import app
from codetune.data import IGNORE_INDEX, load_split
from codetune.families import GENERIC, families, family_for_source, gguf_families, tiny_shape
from codetune.model import load_tokenizer, stop_token_ids
from codetune.recipe import load_recipe

from .conftest import FAMILY_BATCH, FAMILY_STEPS

runner = CliRunner()
PROMPT = "Write a Python function `is_even(n)` that returns True when n is even."


def quiet(*_):
    pass


def _tokenizer(fr):
    return load_tokenizer(fr.recipe)


def _stop_ids(fr):
    tok = _tokenizer(fr)
    return [tok.convert_tokens_to_ids(t) for t in fr.family.stop_tokens]


# ---------------------------------------------------------------------------------------
# prepare, train, resume


def test_prepare_renders_the_familys_template_and_trains_the_answer_to_its_turn_end(family_run):
    fr, tok = family_run, _tokenizer(family_run)
    rows = load_split(fr.run, "train")
    stop = stop_token_ids(tok, fr.recipe.generation.stop_tokens)[0]  # the token that ends an answer
    for row in rows.select(range(20)):
        assert row["text"] == tok.apply_chat_template(row["messages"], tokenize=False)
        prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert row["text"].startswith(prompt)
        # the prompt's tokens as the whole text splits them (Llama's "\n\n" before the answer is two tokens there)
        offsets = tok(row["text"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        n_prompt = sum(start < len(prompt) for start, _ in offsets)
        trained = [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
        # the prompt carries no loss; the answer does, in one piece, up to the family's end of turn
        assert trained[0] == n_prompt and trained == list(range(n_prompt, trained[-1] + 1))
        assert [row["labels"][i] for i in trained] == [row["input_ids"][i] for i in trained]
        last = row["input_ids"][trained[-1]]
        if fr.family.turn_end:  # what the template writes after it (a newline) is never trained
            assert last == tok.convert_tokens_to_ids(fr.family.turn_end)
        else:  # the answer owns the template's whole tail (Phi-3: <|end|>, newline, eos)
            assert trained[-1] == len(row["input_ids"]) - 1
        assert stop in [row["input_ids"][i] for i in trained]  # the model learns to stop
        answer = tok.decode([row["input_ids"][i] for i in trained], skip_special_tokens=True)
        assert answer.strip() == row["reference"].strip()


def test_train_packs_several_examples_per_row_and_targets_the_familys_linear_layers(family_run):
    fr = family_run
    assert fr.result.global_step == FAMILY_STEPS
    summary = json.loads((fr.run / "train_summary.json").read_text())
    lengths = load_split(fr.run, "train")["n_tokens"]
    # packed rows hold several examples: a step sees far more tokens than a batch of single examples
    assert summary["tokens"] / FAMILY_STEPS > 2 * FAMILY_BATCH * sum(lengths) / len(lengths)
    losses = [m["train_loss"] for m in map(json.loads, (fr.run / "metrics.jsonl").read_text().splitlines())]
    losses = [x for x in losses if x is not None]
    assert all(x == x and x < 1e4 for x in losses) and losses[-1] < losses[0]
    adapter = json.loads((fr.run / "adapter" / "adapter_config.json").read_text())
    targeted = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}  # all-linear: every layer's
    assert targeted == set(fr.family.lora_modules(*fr.family.lora_targets))
    if fr.family.pad_token:
        assert load_tokenizer(load_recipe(fr.run / "recipe.yaml")).pad_token == fr.family.pad_token


def test_resume_from_the_last_checkpoint_ends_where_the_whole_run_did(family_run, tmp_path):
    from safetensors.torch import load_file

    from codetune.pipeline import train

    fr, last = family_run, FAMILY_STEPS - FAMILY_STEPS // 4
    cut = tmp_path / "run"  # the run as a kill between its last checkpoint and its end would have left it
    shutil.copytree(fr.run, cut, ignore=shutil.ignore_patterns("adapter", "eval", "train_summary.json", "loss*"))
    for ckpt in (cut / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > last:
            shutil.rmtree(ckpt)
    resumed = train(load_recipe(cut / "recipe.yaml"), cut, resume=True)
    assert resumed.summary["resumed_from"].endswith(f"checkpoint-{last}")
    whole = json.loads((fr.run / "train_summary.json").read_text())
    assert resumed.global_step == whole["global_step"] == FAMILY_STEPS
    assert resumed.summary["tokens"] == whole["tokens"]
    assert resumed.train_loss == pytest.approx(whole["last_train_loss"], rel=1e-4)
    a = load_file(fr.run / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


# ---------------------------------------------------------------------------------------
# eval, generate, chat, load, merge, card, serve


def test_eval_runs_the_held_out_starter_tasks_in_the_sandbox(family_run):
    from codetune.evaluate import evaluate

    fr = family_run
    summary = evaluate(fr.run, ["starter"], recipe=load_recipe(fr.run / "recipe.yaml"), overwrite=True)
    starter = summary["results"]["fine-tuned"]["starter"]
    trained = {json.loads(meta or "{}").get("task_id") for meta in load_split(fr.run, "train")["meta"]}
    lines = [json.loads(x) for x in (fr.run / "eval" / "starter.jsonl").read_text().splitlines()]
    assert len(lines) == starter["tasks"] > 0 and not {x["task_id"] for x in lines} & trained
    assert all(x["verdict"] in {"passed", "failed", "timeout", "killed", "error"} for x in lines)
    assert 0 <= starter["pass@1"] <= 100 and 0 <= starter["parse_rate"] <= 100
    assert starter["sandbox"]  # the isolation the programs ran under is recorded
    assert json.loads((fr.run / "eval" / "summary.json").read_text())["results"]["fine-tuned"]["starter"] == starter


def test_generate_chat_and_load_use_the_familys_settings(family_run):
    import codetune

    fr = family_run
    coder = codetune.load(fr.run)
    assert coder.recipe.generation.stop_tokens == list(fr.family.stop_tokens)
    answer = coder.generate(PROMPT, max_new_tokens=12, do_sample=False)
    assert isinstance(answer, str) and not any(t in answer for t in fr.family.stop_tokens)
    assert coder.chat([{"role": "user", "content": PROMPT}], max_new_tokens=12, do_sample=False) == answer
    res = runner.invoke(app, ["generate", str(fr.run), "--prompt", PROMPT, "--set", "generation.max_new_tokens=12"])
    assert res.exit_code == 0, res.output
    assert answer.strip() in res.stdout
    res = runner.invoke(
        app,
        ["chat", str(fr.run), "--set", "generation.max_new_tokens=8"],
        input=f"{PROMPT}\nAnd for odd numbers?\n/exit\n",
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.count("model> ") == 2 and "Traceback" not in res.output


def test_merge_stops_on_the_familys_tokens_and_loads_as_its_family(family_run, tmp_path):
    from codetune.export import merge
    from codetune.generate import load_for_inference

    fr = family_run
    merged = merge(fr.run, tmp_path / "merged", log=quiet)
    generation = json.loads((merged / "generation_config.json").read_text())
    assert generation["eos_token_id"] == _stop_ids(fr)
    assert family_for_source(merged) is fr.family
    loaded = load_for_inference(merged)  # a model folder: its family's settings, not Phi-3's
    assert loaded.recipe.generation.stop_tokens == list(fr.family.stop_tokens)
    assert loaded.model.config.model_type in fr.family.model_types


def test_card_shows_the_familys_chat_format(family_run):
    from codetune.card import render_card

    fr, tok = family_run, _tokenizer(family_run)
    card = render_card(fr.run)
    turn = tok.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert turn.rstrip("\n") in card
    assert f"It ends its answer with `{fr.family.stop_tokens[0]}`" in card
    for other in families().values():  # no other family's end of turn leaks in (Phi-3's <|end|>, ...)
        if other.stop_tokens[0] not in fr.family.stop_tokens:  # qwen2 and qwen3 share ChatML's <|im_end|>
            assert other.stop_tokens[0] not in card


def test_serve_answers_and_stops_on_each_of_the_familys_stop_tokens(family_run):
    from fastapi.testclient import TestClient

    from codetune.generate import generate
    from codetune.serve import create_app, load_engine

    fr = family_run
    engine = load_engine(fr.run, name="tiny", max_tokens_limit=64)
    messages = [{"role": "user", "content": PROMPT}]
    with TestClient(create_app(engine)) as client:

        def chat(**extra):
            body = {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0, **extra}
            res = client.post("/v1/chat/completions", json=body)
            assert res.status_code == 200, res.text
            return res.json()["choices"][0], res.json()["usage"]

        choice, _ = chat()
        cfg = engine.recipe.generation.model_copy(update={"do_sample": False, "max_new_tokens": 12})
        assert choice["message"]["content"].strip() == generate(engine.model, engine.tokenizer, [messages], cfg)[0]
        # made to say one token: a stop token ends the answer there, and is not part of it
        for token_id in _stop_ids(fr):
            choice, _ = chat(logit_bias={str(token_id): 100})
            assert (choice["finish_reason"], choice["message"]["content"]) == ("stop", "")
        plain = engine.tokenizer("x", add_special_tokens=False)["input_ids"][0]
        choice, usage = chat(logit_bias={str(plain): 100})  # any other token: it goes on to max_tokens
        assert choice["finish_reason"] == "length" and usage["completion_tokens"] == 12
        assert choice["message"]["content"].startswith("x")


# ---------------------------------------------------------------------------------------
# An architecture no family claims


@pytest.fixture(scope="module")
def unknown_model(tmp_path_factory, codetune_home):
    """A tiny Mistral (model_type "mistral": no family claims it) with tiny-qwen2's tokenizer, whose own
    chat template is ChatML and whose eos is <|im_end|>."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from codetune.tiny import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-qwen2"))
    config = MistralConfig(**tiny_shape(tok, sliding_window=None))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("unknown-family") / "tiny-mistral"
    MistralForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_an_unknown_model_type_trains_evaluates_and_merges_with_its_tokenizers_template_and_eos(
    unknown_model, tmp_path
):
    from codetune.evaluate import evaluate
    from codetune.export import merge
    from codetune.generate import load_for_inference
    from codetune.pipeline import train

    assert family_for_source(unknown_model) is GENERIC
    recipe = load_recipe(
        "tiny-cpu",
        [
            f"model.name_or_path={unknown_model}",  # the generic family: the tokenizer's own template, pad, eos
            "training.max_steps=4",
            "training.batch_size=2",
            "training.eval_steps=null",
            "training.save_strategy=no",
            "generation.max_new_tokens=8",
            "evaluation.samples=4",
            "evaluation.compare_base=false",
        ],
    )
    run = tmp_path / "run"
    result = train(recipe, run)
    assert result.global_step == 4 and result.train_loss == result.train_loss  # finite, not NaN
    tok = load_tokenizer(recipe)
    row = load_split(run, "train")[0]
    assert row["text"] == tok.apply_chat_template(row["messages"], tokenize=False)  # the tokenizer's ChatML
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id in trained  # it learns to stop on the eos

    summary = evaluate(run, ["rouge"], recipe=load_recipe(run / "recipe.yaml"))
    assert summary["results"]["fine-tuned"]["rouge"]["samples"] == 4
    assert (run / "eval" / "rouge.jsonl").is_file()

    merged = merge(run, log=quiet)
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == [tok.eos_token_id]
    loaded = load_for_inference(merged)
    assert loaded.model.config.model_type == "mistral" and loaded.recipe.generation.stop_tokens == []
    assert loaded.recipe.tokenizer.chat_template is None  # not Phi-3's: the tokenizer's own

    # GGUF export needs a family's tensor plan: refused, naming the families that have one
    res = runner.invoke(app, ["export", str(run), "--format", "gguf"])
    assert res.exit_code == 2
    message = " ".join(res.output.split())
    assert message.startswith("error: ") and "mistral" in message.lower()
    assert gguf_families() and all(name in message for name in gguf_families()), message
    assert not list(run.glob("*.gguf"))
