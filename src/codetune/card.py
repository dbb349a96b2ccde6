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

from .evaluate import summary_markdown
from .families import family_for_source
from .model import stop_token_ids
from .recipe import Recipe, RecipeError, load_recipe
from .rundir import RunDir, check_target, is_card, staged_file
from .suites import all_suites

ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}


def check_repo_id(repo_id: str) -> str:
    """A hub repo id as the hub takes it (huggingface_hub's own validator), with its OWNER/: the card's
    snippet and metadata embed it, so nothing else may get through."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = str(exc).rsplit(": '", 1)[0].rstrip(".")  # the validator's rule, without the id repeated
        raise RecipeError(f"--repo-id {repo_id!r} is not a hub repo id: {reason}") from None
    if "/" not in repo_id:
        raise RecipeError(f"--repo-id {repo_id!r}: expected OWNER/NAME")
    return repo_id


def _code(text: str) -> str:
    """``text`` as one inline code span of the card's markdown, whatever backticks or newlines it holds."""
    text = str(text).replace("\n", "\\n")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    return f"{ticks} {text} {ticks}" if longest else f"{ticks}{text}{ticks}"


def _fence(text: str, lang: str) -> str:
    """``text`` as a fenced block longer than any backtick run inside it, so it cannot close the fence."""
    longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=2)
    ticks = "`" * (longest + 1)
    return f"{ticks}{lang}\n{text}\n{ticks}"


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
    """The run's evaluation as the card may show it: only results that ``codetune eval RUN_DIR`` made from the
    adapter the card describes and recorded as such (its SHA-256, on the summary and on each suite). A
    summary that does not record it (scores of completions made elsewhere, another model's) or records
    another adapter is refused; None when there is nothing of the adapter's own to show."""
    rd = RunDir(run_dir)
    path = rd.eval_summary
    summary = rd.read_eval_summary()  # a damaged one is one error naming it and the field
    if summary is None:
        return None
    made_from, current = summary.get("adapter_sha256"), rd.adapter_fingerprint()
    if made_from is None or made_from != current:
        what = "does not record the adapter it scores" if made_from is None else "scores another adapter than"
        raise RecipeError(
            f"{path} {what} {rd.adapter} (results of completions made elsewhere, of another model, or of an "
            f"earlier training): run `codetune eval {run_dir} --overwrite` first, then the card"
        )
    return _own_results(summary, current)


def _own_results(summary: dict, adapter_sha256: str) -> dict | None:
    """The fine-tuned model's suites made from this adapter, with the base model's scores of the same suites."""
    results = summary["results"]
    tuned = results.get("fine-tuned") if isinstance(results.get("fine-tuned"), dict) else {}
    suites = [s for s, info in tuned.items() if isinstance(info, dict) and info.get("adapter_sha256") == adapter_sha256]
    if not suites:
        return None
    own = {"fine-tuned": {s: tuned[s] for s in suites}}
    base = results.get("base") if isinstance(results.get("base"), dict) else {}
    if any(s in base for s in suites):
        own["base"] = {s: base[s] for s in suites if s in base}
    return {**summary, "suites": suites, "results": own}


def _sandbox_levels(summary: dict) -> str:
    """The isolation level(s) the executed suites ran under (summary.json records one per suite)."""
    levels = sorted({str(r["sandbox"]) for m in summary["results"].values() for r in m.values() if "sandbox" in r})
    return f" (isolation level: {', '.join(levels)})" if levels else ""


def _eval_results(summary: dict | None, dataset: str) -> list:
    """The fine-tuned model's scores as ``huggingface_hub.EvalResult``s (the card's model-index)."""

    if not summary:
        return []
    tuned = summary["results"].get("fine-tuned") or {}  # never another entry: not the adapter's
    results = []
    for suite in all_suites():
        info = tuned.get(suite.name)
        if not info:
            continue
        if suite.scoring == "rouge":
            if "rougeL" not in info:  # no samples scored: no ROUGE to publish
                continue
            results += _rouge_results(info, suite.card_dataset or (dataset, None, "test"))
        # a partial suite's score is not the suite's score, nor is one on tasks not known to be held out
        elif suite.card_dataset and not (info.get("partial") or (suite.held_out and info.get("held_out") is False)):
            results += _pass_at_k_results(info, suite.card_dataset)
    return results


_TASK = {"task_type": "text-generation", "task_name": "Code generation"}


def _rouge_results(info: dict, card_dataset: tuple[str, str | None, str]) -> list:
    from huggingface_hub import EvalResult

    # The hub groups metrics by task, dataset type and split (not by dataset name): the split keeps
    # ROUGE on the test rows apart from pass@k on the held-out starter tasks of the same dataset.
    dtype, dname, split = card_dataset
    name = dname or f"{dtype} (test split, first {info['samples']} rows)"
    return [
        EvalResult(
            **_TASK,
            dataset_type=dtype,
            dataset_name=name,
            dataset_split=split,
            metric_type="rouge",
            metric_name=label,
            metric_value=round(info[key], 2),
        )
        for key, label in ROUGE_NAMES.items()
    ]


def _pass_at_k_results(info: dict, card_dataset: tuple[str, str, str]) -> list:
    from huggingface_hub import EvalResult

    dtype, dname, split = card_dataset
    return [
        EvalResult(
            **_TASK,
            dataset_type=dtype,
            dataset_name=dname,
            dataset_split=split,
            metric_type=key,
            metric_name=key,
            metric_value=round(value, 2),
        )
        for key, value in info.items()
        if key.startswith("pass@")
    ]


def card_metadata(name: str, recipe: Recipe, summary: dict | None, dataset: str):
    """The card's YAML header as ``huggingface_hub.ModelCardData`` (it writes the model-index itself)."""
    from huggingface_hub import ModelCardData

    return ModelCardData(
        base_model=recipe.model.name_or_path,
        library_name="peft",
        license="apache-2.0",
        language=["code", "en"],
        pipeline_tag="text-generation",
        tags=["codetune", "qlora", "peft", "lora", "code", "python"],
        datasets=[dataset],
        model_name=name,
        eval_results=_eval_results(summary, dataset) or None,
    )


def _adapter_tokenizer(run_dir: Path):
    """The tokenizer training saved with the adapter (what the card's snippet loads)."""
    from transformers import AutoTokenizer

    adapter = RunDir(run_dir).adapter
    try:
        return AutoTokenizer.from_pretrained(adapter)
    except (OSError, ValueError, TypeError) as exc:
        raise RecipeError(
            f"{adapter}: the tokenizer saved with the adapter cannot be loaded ({' '.join(str(exc).split())[:300]}); "
            "train the run again or restore the adapter folder"
        ) from None


def _stop_ids(run_dir: Path, recipe: Recipe) -> list[int]:
    return stop_token_ids(_adapter_tokenizer(run_dir), recipe.generation.stop_tokens)


CARD_PROMPT = "Write a Python function that checks whether a number is prime."


def _chat_format_section(run_dir: Path, recipe: Recipe) -> list[str]:
    """How a prompt looks: the family's example, else the run's own template rendering one user turn."""
    family = family_for_source(recipe.model.name_or_path, revision=recipe.model.revision)
    if family.prompt_example:
        example = family.prompt_example.format(prompt=CARD_PROMPT)
    else:
        tok = _adapter_tokenizer(run_dir)
        example = tok.apply_chat_template(
            [{"role": "user", "content": CARD_PROMPT}], tokenize=False, add_generation_prompt=True
        )
    stops = recipe.generation.stop_tokens
    if not stops:
        stop_line = "It ends its answer with its tokenizer's end-of-sequence token: stop generation there."
    elif len(stops) == 1:
        stop_line = f"It ends its answer with {_code(stops[0])}: stop generation there."
    else:
        rest = ", ".join(_code(t) for t in stops[1:])
        stop_line = f"It ends its answer with {_code(stops[0])}: stop generation there as well as at {rest}."
    return [
        "## Chat format",
        "",
        "The model answers in its tokenizer's chat template; a prompt is one user turn:",
        "",
        _fence(example.rstrip("\n"), "text"),
        "",
        stop_line,
        "",
    ]


def usage_snippet(model_id: str, stop_ids: list[int], prompt: str) -> str:
    return f'''```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model_id = {json.dumps(model_id)}
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
    """The card's text: its YAML header (model-index from the evaluation), then one section after another."""
    from huggingface_hub import ModelCard

    run_dir = Path(run_dir)
    recipe = _run_recipe(run_dir)
    summary = _eval_summary(run_dir)
    name = check_repo_id(repo_id).split("/")[-1] if repo_id else f"{recipe.name}-qlora"
    lines = [
        *_intro_section(name, recipe),
        *_training_section(run_dir),
        *_recipe_section(recipe),
        *_evaluation_section(run_dir, recipe, summary),
        *_rl_section(run_dir, summary),
        *_chat_format_section(run_dir, recipe),
        *_usage_section(run_dir, recipe, repo_id),
        *_versions_section(),
    ]
    data = card_metadata(name, recipe, summary, _dataset_name(recipe))
    # ModelCard parses the header back, so a malformed one fails here rather than on the hub
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n"))


def _run_recipe(run_dir: Path) -> Recipe:
    """The recipe of a run directory that has trained (the card describes its adapter)."""
    rd = RunDir(run_dir)
    recipe = load_recipe(rd.recipe_file) if rd.recipe_file.is_file() else None  # a damaged one named first
    rd.require_adapter()
    return recipe


def _dataset_name(recipe: Recipe) -> str:
    """The training data as the hub's metadata names it: a hub id, the starter set, or a local file's name."""
    source = recipe.data.source
    if source == "starter":
        return "codetune-starter"
    return Path(source).name if Path(source).exists() else source


def _intro_section(name: str, recipe: Recipe) -> list[str]:
    lines = [
        "",
        f"# {name}",
        "",
        f"A QLoRA fine-tune of {_code(recipe.model.name_or_path)} into a Python coder, made with "
        f"codetune from the recipe `{recipe.name}`. Scores are measured by "
        "running the code the model writes (pass@k in a sandbox) as well as ROUGE against reference "
        "answers.",
        "",
    ]
    desc = recipe.description.strip()
    if desc:
        lines += ["> " + desc.replace("\n", "\n> "), ""]
    return lines


def _training_section(run_dir: Path) -> list[str]:
    """What training did (train_summary.json), its loss table and plot."""
    lines = ["## Training", ""]
    rd = RunDir(run_dir)
    done = rd.read_train_summary()  # checked: a damaged one is one error naming it and the field
    if done is not None:
        lines += [
            f"- optimizer steps: {_n(done.get('global_step'))}, epochs: {_n(done.get('epochs'), '.2f')}, "
            f"tokens seen: {_n(done.get('tokens'), ',')}",
            f"- trainable parameters: {_n(done.get('trainable_parameters'), ',')} of "
            f"{_n(done.get('total_parameters'), ',')}",
            f"- device: {_code(done.get('device') or '?')}, processes: {_n(done.get('world_size'))}",
            "",
        ]
    if rd.loss_table.is_file():
        lines += [rd.loss_table.read_text().rstrip(), ""]
    if rd.loss_plot.is_file():
        lines += [f"![training and validation loss]({RunDir.LOSS_PLOT})", ""]
    return lines


def _n(value: int | float | None, spec: str = "") -> str:
    """A number of train_summary.json as the card shows it; "?" for one the file does not record."""
    return "?" if value is None else format(value, spec)


def _recipe_section(recipe: Recipe) -> list[str]:
    lines = [
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
        lines.append(f"| {_code(key)} | {_code(shown).replace('|', chr(92) + '|')} |")
    lines.append("")
    return lines


TINY_MODEL_NOTE = (
    "**What this tiny model can and cannot show.** Its base is a 2-layer Phi-3 that codetune builds and "
    "pre-trains on Python standard-library source in a minute, so that the whole pipeline runs offline on "
    "a CPU. Fine-tuning teaches it the chat format and the shape of an answer (ROUGE and the parse rate), "
    "and it passes, by execution, new members of the task families it was taught (`starter-family`: other "
    "function and parameter names, constants and types than any it trained on), which its base never does. "
    "That is all it can show: tasks unlike any it trained on (`starter-novel`), HumanEval and MBPP stay at "
    "or near 0, since a base this small knows little Python; they need a real base model "
    "(`phi3-mini-python`)."
)


def _evaluation_section(run_dir: Path, recipe: Recipe, summary: dict | None) -> list[str]:
    """The evaluation's tables (eval/summary.md, one heading level down) and how they were measured."""
    lines = ["## Evaluation", ""]
    if summary:
        md = summary_markdown(summary["results"], "Evaluation")  # the run's own results only
        body = md.split("\n", 1)[1].strip()
        lines += [
            body.replace("## ", "### "),
            "",
            f"Generation: {_gen_line(recipe)}. ROUGE is the reference card's method: `rouge_score` with "
            "the stemmer, the F-measure x 100 per sample, averaged. pass@k is the unbiased estimator over "
            f"{recipe.evaluation.n_samples} sample(s) per task, executed in codetune's sandbox"
            f"{_sandbox_levels(summary)}.",
            "",
        ]
    else:
        lines += ["Not evaluated yet: run `codetune eval` on the run directory, then `codetune card` again.", ""]
    if recipe.model.name_or_path == "builtin:tiny-phi3":
        lines += [TINY_MODEL_NOTE, ""]
    return lines


def _rl_section(run_dir: Path, summary: dict | None) -> list[str]:
    """GRPO after SFT (``codetune rl``), when the run has it: the method and reward, what the difficulty filter
    kept, and the executed suites' pass@1 of the SFT adapter beside GRPO's (rl/eval/, shown only when it was
    made from the rl/adapter there now). The card's weights stay the SFT adapter's."""
    rd = RunDir(run_dir, stage="rl")
    if not rd.rl_summary.is_file():
        return []
    try:
        done = json.loads(rd.rl_summary.read_text(encoding="utf-8"))
        cfg, steps, tasks = done["rl"], int(done["steps"]), int(done["tasks"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RecipeError(f"{rd.rl_summary} is damaged ({type(exc).__name__}: {exc}): run `codetune rl` again") from None
    kept = done.get("filter") or {}
    lines = [
        "## Reinforcement learning (GRPO)",
        "",
        f"After SFT, `codetune rl` trained the adapter further with GRPO (TRL's GRPOTrainer): {steps} steps on "
        f"{tasks} tasks, {cfg.get('num_generations')} completions per prompt, {cfg.get('prompts_per_step')} "
        f"prompts per step, temperature {cfg.get('temperature')}, learning rate {cfg.get('learning_rate')}, "
        f"loss `{cfg.get('loss_type')}`, beta {cfg.get('beta')}. The reward is `{cfg.get('reward')}` of the task's "
        "tests run in codetune's sandbox, eval's own scoring path"
        + (
            f", plus {cfg['format_reward']} for an answer whose code parses and defines the task's function"
            if cfg.get("format_reward")
            else ""
        )
        + f"; every {_n(cfg.get('hold_back_every'))}th test is held back, measured and never rewarded.",
        "",
    ]
    if kept:
        lines += [
            f"Difficulty filter: {kept.get('kept')} of {kept.get('candidates')} tasks kept (passed sometimes but "
            f"not always over {cfg.get('filter_samples')} samples).",
            "",
        ]
    rl_eval, current = rd.read_eval_summary(), rd.adapter_fingerprint()
    own = _own_results(rl_eval, current) if rl_eval and rl_eval.get("adapter_sha256") == current else None
    if own is None:  # nothing, or results of another adapter than the rl/adapter there now
        return lines + ["Not evaluated after GRPO: `codetune eval RUN --adapter rl`, then `codetune card` again.", ""]
    after = own["results"]["fine-tuned"]
    before = (summary or {}).get("results", {}).get("fine-tuned", {})
    executed = [s for s in after if "pass@1" in after[s]]
    if executed:
        lines += ["| suite | pass@1 after SFT | pass@1 after GRPO |", "|---|---|---|"]
        for suite in executed:
            sft = before.get(suite, {}).get("pass@1")
            lines.append(f"| {suite} | {'-' if sft is None else f'{sft:.2f}'} | {after[suite]['pass@1']:.2f} |")
        lines.append("")
    lines += ["The weights this card describes are the SFT adapter; GRPO's is `rl/adapter/` in the run.", ""]
    return lines


def _usage_section(run_dir: Path, recipe: Recipe, repo_id: str | None) -> list[str]:
    model_id = repo_id or str(RunDir(run_dir).adapter.resolve())
    return [
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


def _versions_section() -> list[str]:
    packages = ("codetune", "transformers", "peft", "trl", "torch", "bitsandbytes")
    return ["## Framework versions", "", *(f"- {pkg} {_version(pkg)}" for pkg in packages)]


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


def write_card(run_dir: Path, *, repo_id: str | None = None, overwrite: bool = False) -> Path:
    """Write ``RUN_DIR/README.md``; an existing one is replaced only with ``overwrite`` and only if it is
    a card codetune wrote."""
    rd = RunDir(run_dir)
    if repo_id is not None:
        check_repo_id(repo_id)
    rules = dict(overwrite=overwrite, ours=is_card, what="model card", elsewhere=None)  # card has no --out
    check_target(rd.card, "card", **rules)
    text = render_card(run_dir, repo_id=repo_id)
    with staged_file(rd.card, "card", **rules) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return rd.card


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

    check_repo_id(repo_id)
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    rd.require_adapter()
    if constants.HF_HUB_OFFLINE:
        raise RecipeError("cannot push: HF_HUB_OFFLINE is set (this machine is offline); nothing was uploaded")
    card = render_card(run_dir, repo_id=repo_id)  # in memory: the run directory is left as it is
    with tempfile.TemporaryDirectory(prefix="codetune-push-") as tmp:
        stage = Path(tmp)
        for f in rd.adapter.iterdir():
            if f.is_file():
                shutil.copy2(f, stage / f.name)
        (stage / RunDir.CARD).write_text(card)
        for extra in (rd.loss_plot, rd.loss_table, rd.recipe_file, rd.train_summary):
            if extra.is_file():
                shutil.copy2(extra, stage / extra.name)
        if rd.eval_summary.is_file():
            (stage / RunDir.EVAL).mkdir()
            for f in (rd.eval_summary, rd.eval_summary.with_suffix(".md")):
                shutil.copy2(f, stage / RunDir.EVAL / f.name)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=str(stage), commit_message=f"codetune: {run_dir.name}"
            )
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise RecipeError(f"cannot push to {repo_id}: {exc}") from None
    return str(getattr(info, "repo_url", f"https://huggingface.co/{repo_id}"))
