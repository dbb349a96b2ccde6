"""``codetune card`` and ``codetune push``: a Hugging Face model card with the run's real numbers.

The card is written from the run directory alone: the resolved recipe, the loss table and plot
from training, and the evaluation summary. Its usage snippet is meant to run exactly as written
(the test suite extracts it from a card and runs it).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .recipe import Recipe, RecipeError, load_recipe

CARD = "README.md"
ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def _eval_summary(run_dir: Path) -> dict | None:
    path = run_dir / "eval" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _model_index(name: str, summary: dict | None, dataset: str) -> list[dict]:
    if not summary:
        return [{"name": name, "results": []}]
    tuned = summary["results"].get("fine-tuned") or next(iter(summary["results"].values()))
    results = []
    if "rouge" in tuned:
        results.append(
            {
                "task": {"type": "text-generation", "name": "Code generation"},
                "dataset": {"type": dataset, "name": f"{dataset} (test split, first {tuned['rouge']['samples']} rows)"},
                "metrics": [
                    {"type": "rouge", "name": ROUGE_NAMES[k], "value": round(tuned["rouge"][k], 2)} for k in ROUGE_NAMES
                ],
            }
        )
    datasets = {
        "humaneval": ("openai_humaneval", "HumanEval"),
        "mbpp": ("mbpp", "MBPP (test, tasks 11-510)"),
        "starter": ("codetune-starter", "codetune starter set (held-out tasks)"),
        "starter-family": ("codetune-starter", "codetune starter set (held-out members of taught task families)"),
        "starter-novel": ("codetune-starter", "codetune starter set (held-out tasks unlike any trained on)"),
    }
    for suite, (dtype, dname) in datasets.items():
        if suite in tuned:
            metrics = [
                {"type": k, "name": k, "value": round(v, 2)} for k, v in tuned[suite].items() if k.startswith("pass@")
            ]
            results.append(
                {
                    "task": {"type": "text-generation", "name": "Code generation"},
                    "dataset": {"type": dtype, "name": dname},
                    "metrics": metrics,
                }
            )
    return [{"name": name, "results": results}]


def _stop_ids(run_dir: Path, recipe: Recipe) -> list[int]:
    from transformers import AutoTokenizer

    from .model import stop_token_ids
    from .train import ADAPTER

    tok = AutoTokenizer.from_pretrained(run_dir / ADAPTER)
    return stop_token_ids(tok, recipe.generation.stop_tokens)


def usage_snippet(model_id: str, stop_ids: list[int], prompt: str) -> str:
    return f'''```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model_id = "{model_id}"
model = AutoPeftModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained(model_id)

messages = [{{"role": "user", "content": {prompt!r}}}]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
).to(model.device)
output = model.generate(**inputs, max_new_tokens=256, do_sample=False, eos_token_id={stop_ids})
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def render_card(run_dir: Path, *, repo_id: str | None = None) -> str:
    from .train import ADAPTER

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise RecipeError(f"{run_dir} is not a run directory (no recipe.yaml)")
    if not (run_dir / ADAPTER / "adapter_config.json").is_file():
        raise RecipeError(f"{run_dir} has no trained adapter: run `codetune train` first")
    recipe = load_recipe(run_dir / "recipe.yaml")
    summary = _eval_summary(run_dir)
    train_summary = (
        json.loads((run_dir / "train_summary.json").read_text()) if (run_dir / "train_summary.json").is_file() else {}
    )
    name = repo_id.split("/")[-1] if repo_id else f"{recipe.name}-qlora"
    dataset = (
        recipe.data.source
        if recipe.data.source not in ("starter",) and not Path(recipe.data.source).exists()
        else "codetune-starter"
        if recipe.data.source == "starter"
        else Path(recipe.data.source).name
    )
    meta: dict[str, Any] = {
        "base_model": recipe.model.name_or_path,
        "library_name": "peft",
        "license": "apache-2.0",
        "language": ["code", "en"],
        "pipeline_tag": "text-generation",
        "tags": ["codetune", "qlora", "peft", "lora", "code", "python"],
        "datasets": [dataset],
        "model-index": _model_index(name, summary, dataset),
    }
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"A QLoRA fine-tune of **{recipe.model.name_or_path}** into a Python coder, made with "
        f"codetune from the recipe `{recipe.name}`. Scores are measured by "
        "running the code the model writes (pass@k in a sandbox) as well as ROUGE against reference "
        "answers.",
        "",
    ]
    desc = recipe.description.strip()
    if desc:
        lines += ["> " + desc.replace("\n", "\n> "), ""]

    lines += ["## Training", ""]
    if train_summary:
        lines += [
            f"- optimizer steps: {train_summary['global_step']}, epochs: {train_summary['epochs']:.2f}, "
            f"tokens seen: {train_summary['tokens']:,}",
            f"- trainable parameters: {train_summary['trainable_parameters']:,} of "
            f"{train_summary['total_parameters']:,}",
            f"- device: {train_summary['device']}, processes: {train_summary['world_size']}",
            "",
        ]
    loss_table = run_dir / "loss_table.md"
    if loss_table.is_file():
        lines += [loss_table.read_text().rstrip(), ""]
    if (run_dir / "loss.png").is_file():
        lines += ["![training and validation loss](loss.png)", ""]
    lines += [
        "### The recipe",
        "",
        "Every setting of the run, resolved (`recipe.yaml`):",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key, value in _flatten(recipe.model_dump(mode="json")):
        if key == "description":
            continue
        shown = json.dumps(value) if not isinstance(value, str) else value
        shown = shown.replace("|", "\\|").replace("\n", "\\n")
        lines.append(f"| `{key}` | `{shown}` |")
    lines.append("")

    lines += ["## Evaluation", ""]
    if summary:
        md = (run_dir / "eval" / "summary.md").read_text()
        body = md.split("\n", 1)[1].strip() if md.startswith("# ") else md.strip()
        lines += [
            body.replace("## ", "### "),
            "",
            f"Generation: {_gen_line(recipe)}. ROUGE is the reference card's method: `rouge_score` with "
            "the stemmer, the F-measure x 100 per sample, averaged. pass@k is the unbiased estimator over "
            f"{recipe.evaluation.n_samples} sample(s) per task, executed in codetune's sandbox.",
            "",
        ]
    else:
        lines += ["Not evaluated yet: run `codetune eval` on the run directory, then `codetune card` again.", ""]
    if recipe.model.name_or_path == "builtin:tiny-phi3":
        lines += [
            "**What this tiny model can and cannot show.** Its base is a 2-layer Phi-3 that codetune builds and "
            "pre-trains on Python standard-library source in a minute, so that the whole pipeline runs offline on "
            "a CPU. Fine-tuning teaches it the chat format and the shape of an answer (ROUGE and the parse rate), "
            "but it cannot yet pass held-out tasks by execution, not even new members of the task families it was "
            "taught (`starter-family`): its answers barely depend on the instruction and name a function from its "
            "training instead of the one asked for (a base this small never learned to copy an unseen name). "
            "`starter-novel`, HumanEval and MBPP need a real base model (`phi3-mini-python`).",
            "",
        ]

    lines += [
        "## Chat format",
        "",
        "The model answers in its tokenizer's chat template; a prompt is one user turn:",
        "",
        "```text",
        "<|user|>",
        "Write a Python function that checks whether a number is prime.<|end|>",
        "<|assistant|>",
        "```",
        "",
        "It ends its answer with `<|end|>`: stop generation there as well as at `<|endoftext|>`.",
        "",
    ]

    model_id = repo_id or str((run_dir / ADAPTER).resolve())
    lines += [
        "## Usage",
        "",
        "Runs as written (`pip install transformers peft accelerate`):",
        "",
        usage_snippet(
            model_id,
            _stop_ids(run_dir, recipe),
            "Write a Python function `is_prime(n)` that returns True if n is a prime number.",
        ),
        "",
    ]
    lines += ["## Framework versions", ""] + [
        f"- {pkg} {_version(pkg)}" for pkg in ("codetune", "transformers", "peft", "trl", "torch", "bitsandbytes")
    ]
    return "\n".join(lines) + "\n"


def _gen_line(recipe: Recipe) -> str:
    g = recipe.generation
    mode = (
        f"sampling (temperature {g.temperature}, top_k {g.top_k}, top_p {g.top_p}, seed {g.seed})"
        if g.do_sample
        else "greedy"
    )
    return f"{mode}, at most {g.max_new_tokens} new tokens, stop on {', '.join(g.stop_tokens)}"


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


def write_card(run_dir: Path, *, repo_id: str | None = None) -> Path:
    text = render_card(run_dir, repo_id=repo_id)
    path = Path(run_dir) / CARD
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def extract_usage(card_text: str) -> str:
    """The Python block of the card's Usage section."""
    section = card_text.split("## Usage", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    if not match:
        raise ValueError("the card has no Python usage snippet")
    return match.group(1)


# ---------------------------------------------------------------------------------------
# Push


def push(run_dir: Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload adapter, card and plots to ``repo_id`` on the Hugging Face hub; returns the repo URL.

    Offline (HF_HUB_OFFLINE=1) or when the hub cannot be reached, fails with a clear message and
    changes nothing: not the hub, not the run directory.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    from .train import ADAPTER

    run_dir = Path(run_dir)
    if not (run_dir / ADAPTER / "adapter_config.json").is_file():
        raise RecipeError(f"{run_dir} has no trained adapter: nothing to push")
    if "/" not in repo_id:
        raise RecipeError(f"--repo-id {repo_id!r}: expected OWNER/NAME")
    if constants.HF_HUB_OFFLINE:
        raise RecipeError("cannot push: HF_HUB_OFFLINE is set (this machine is offline); nothing was uploaded")
    card = render_card(run_dir, repo_id=repo_id)  # in memory: the run directory is left as it is
    with tempfile.TemporaryDirectory(prefix="codetune-push-") as tmp:
        stage = Path(tmp)
        for f in (run_dir / ADAPTER).iterdir():
            if f.is_file():
                shutil.copy2(f, stage / f.name)
        (stage / CARD).write_text(card)
        for extra in ("loss.png", "loss_table.md", "recipe.yaml", "train_summary.json"):
            if (run_dir / extra).is_file():
                shutil.copy2(run_dir / extra, stage / extra)
        if (run_dir / "eval" / "summary.json").is_file():
            (stage / "eval").mkdir()
            for f in ("summary.json", "summary.md"):
                shutil.copy2(run_dir / "eval" / f, stage / "eval" / f)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=str(stage), commit_message=f"codetune: {run_dir.name}"
            )
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise RecipeError(f"cannot push to {repo_id}: {exc}") from None
    return str(getattr(info, "repo_url", f"https://huggingface.co/{repo_id}"))
