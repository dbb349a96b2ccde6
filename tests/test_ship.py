"""Merge, model card and push on a trained tiny run."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from codetune.card import extract_usage, render_card, write_card
from codetune.cli import app
from codetune.pipeline import train
from codetune.recipe import RecipeError, load_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir):
    run = tmp_path_factory.mktemp("ship") / "run"
    train(load_recipe("tiny-cpu", ["training.max_steps=30", "training.eval_steps=10"]), run)
    res = runner.invoke(
        app,
        [
            "eval",
            str(run),
            "--suite",
            "rouge",
            "--suite",
            "starter",
            "--set",
            "evaluation.samples=6",
            "--set",
            "generation.max_new_tokens=32",
        ],
    )
    assert res.exit_code == 0, res.output
    return run


def test_merged_logits_match_base_plus_adapter(run_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from codetune.model import load_base_model

    res = runner.invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.dtype == torch.bfloat16
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())  # never merged into 4-bit
    stops = merged.generation_config.eos_token_id
    assert set(stops) == {6, 3}  # <|end|> and <|endoftext|>
    recipe = load_recipe(run_dir / "recipe.yaml")
    reference = PeftModel.from_pretrained(
        load_base_model(recipe, quantize=False, dtype="bfloat16"), str(run_dir / "adapter")
    ).eval()
    ids = torch.randint(10, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = reference(input_ids=ids).logits.float()
        b = merged(input_ids=ids).logits.float()
    scale = a.abs().max().item()
    assert (a - b).abs().max().item() <= 0.02 * scale  # bf16 keeps ~3 significant digits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9  # random inputs: some near-ties flip
    # and the adapter really changed the model: the merged model is not the base
    base = load_base_model(recipe, quantize=False, dtype="bfloat16").eval()
    with torch.no_grad():
        c = base(input_ids=ids).logits.float()
    assert (c - b).abs().max().item() > 0.05 * scale


def test_a_merged_folder_carries_its_runs_settings(run_dir, tmp_path):
    from codetune.source import Source

    res = runner.invoke(app, ["merge", str(run_dir), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    run = load_recipe(run_dir / "recipe.yaml")
    # evaluating, generating or serving the folder alone uses its run's settings, not its family's default
    # recipe (phi3-mini-python: max_new_tokens 512 instead of the run's 128)
    recipe = Source.of(tmp_path / "merged").recipe()
    assert recipe.generation == run.generation and recipe.generation.max_new_tokens == 128
    assert recipe.evaluation == run.evaluation
    model = Source.of(tmp_path / "merged").model_recipe(recipe)
    assert model.model.name_or_path == str(tmp_path / "merged") and not model.quantization.load_in_4bit
    # a recipe named with --recipe still wins, and --set applies on top of the carried one
    assert Source.of(tmp_path / "merged").recipe("phi3-mini-python").generation.max_new_tokens == 512
    assert Source.of(tmp_path / "merged").recipe(None, ["generation.max_new_tokens=7"]).generation.max_new_tokens == 7


def test_merge_needs_an_adapter(tmp_path, run_dir):
    (tmp_path / "recipe.yaml").write_text((run_dir / "recipe.yaml").read_text())
    res = runner.invoke(app, ["merge", str(tmp_path)])
    assert res.exit_code == 2 and "has no trained adapter" in res.output


def test_card_has_metadata_tables_and_real_numbers(run_dir):
    import yaml

    text = write_card(run_dir, overwrite=True).read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "builtin:tiny-phi3" and meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] and "codetune" in meta["tags"]
    results = meta["model-index"][0]["results"]
    summary = json.loads((run_dir / "eval/summary.json").read_text())["results"]
    rouge_l = next(m["value"] for r in results for m in r["metrics"] if m["name"] == "ROUGE-L")
    assert rouge_l == round(summary["fine-tuned"]["rouge"]["rougeL"], 2)
    assert any(m["type"] == "pass@1" for r in results for m in r["metrics"])
    assert "| Step | Training Loss | Validation Loss |" in text and "![training and validation loss](loss.png)" in text
    assert "| `lora.r` | `64` |" in text and "| `data.loss_on` | `answer` |" in text
    assert "| rougeL |" in text and "fine-tuned" in text and "base" in text
    assert "<|user|>" in text and "<|end|>" in text


def test_card_usage_snippet_runs_as_written(run_dir, tmp_path):
    snippet = extract_usage(write_card(run_dir, overwrite=True).read_text())
    script = tmp_path / "usage.py"
    script.write_text(snippet)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip()  # it printed the model's answer


def test_card_for_a_repo_points_the_snippet_there(run_dir):
    text = render_card(run_dir, repo_id="someone/tiny-coder")
    assert 'model_id = "someone/tiny-coder"' in extract_usage(text)
    assert "# tiny-coder" in text


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_push_offline_fails_clearly_and_changes_nothing(run_dir, monkeypatch):
    before = _digest(run_dir)
    res = runner.invoke(app, ["push", str(run_dir), "--repo-id", "someone/tiny-coder"])
    assert res.exit_code == 2 and "offline" in res.output and "nothing was uploaded" in res.output
    assert _digest(run_dir) == before
    with pytest.raises(RecipeError, match="expected OWNER/NAME"):
        from codetune.card import push

        push(run_dir, "no-owner")


def test_card_metadata_is_huggingface_hubs_and_keeps_each_suite_apart():
    import yaml
    from huggingface_hub import ModelCard

    from codetune.card import card_metadata

    recipe = load_recipe("tiny-cpu")
    summary = {
        "results": {
            "fine-tuned": {
                "rouge": {"samples": 19, "rouge1": 20.0, "rouge2": 1.0, "rougeL": 16.666, "rougeLsum": 19.0},
                "starter": {"tasks": 19, "pass@1": 31.579, "parse_rate": 90.0},
                "humaneval": {"tasks": 164, "pass@1": 1.2195},
            },
            "base": {"starter": {"tasks": 19, "pass@1": 0.0}},
        }
    }
    data = card_metadata("tiny-coder", recipe, summary, "codetune-starter")
    meta = yaml.safe_load(data.to_yaml())
    (index,) = meta["model-index"]
    assert index["name"] == "tiny-coder"
    by_dataset = {r["dataset"]["name"]: {m["name"]: m["value"] for m in r["metrics"]} for r in index["results"]}
    # ROUGE and the starter pass@1 share a dataset type: each must still sit under its own dataset
    assert by_dataset == {
        "codetune-starter (test split, first 19 rows)": {
            "ROUGE-1": 20.0,
            "ROUGE-2": 1.0,
            "ROUGE-L": 16.67,
            "ROUGE-Lsum": 19.0,
        },
        "codetune starter set (held-out tasks)": {"pass@1": 31.58},
        "HumanEval": {"pass@1": 1.22},
    }
    # the hub's own parser reads it back (base scores are not the model's: never in its model-index)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n# x\n")
    assert card.data.base_model == "builtin:tiny-phi3" and len(card.data.eval_results) == 6
    assert "model-index" not in yaml.safe_load(card_metadata("x", recipe, None, "d").to_yaml())
