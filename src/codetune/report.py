"""``codetune report``: one self-contained HTML page for a run (``codetune serve`` shows it at ``/``).

The report holds the loss curves (``metrics.jsonl``, drawn as inline SVG by matplotlib), the
evaluation tables base against fine-tuned (``eval/summary.json``) and a sample browser over every
scored answer (``eval/SUITE.jsonl`` against ``eval/base/SUITE.jsonl``): the prompt, both models'
answers, the extracted code, the verdict and the error, filterable by passed / failed / changed,
the tasks the fine-tune fixed or broke first.

Completions are untrusted text: every value goes through ``html.escape`` and the page carries no
data inside a script. The Content-Security-Policy only admits the page's own script (by hash), so
even a slip in escaping could not run anything. No network is needed to open the file.

The page's template, stylesheet and script are package data (``codetune/report_assets``: ``page.html``,
``report.css``, ``report.js``), read with importlib.resources; the CSP hash is computed over the script
as the page carries it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from .errors import OutputError, RecipeError
from .rundir import EVAL_SUMMARY, RunDir, check_target, is_report, staged_file
from .runfiles import read_eval_summary

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# ---------------------------------------------------------------------------------------
# Reading the run


def _read_rows(path: Path) -> list[dict]:
    from .data import DataError, read_jsonl

    try:
        rows = read_jsonl(path)
    except DataError as exc:
        raise RecipeError(str(exc)) from None
    for row in rows:
        if "__not_an_object__" in row:
            raise RecipeError(f"{path}, row {row['__row__']}: expected a JSON object")
    return rows


def eval_dir_of(run_dir: Path) -> Path | None:
    """``RUN_DIR/eval``, or RUN_DIR itself when it is an ``eval --out`` folder."""
    if RunDir(run_dir).eval.is_dir():
        return RunDir(run_dir).eval
    if (run_dir / EVAL_SUMMARY).is_file():
        return run_dir
    return None


def _loss_points(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The training and validation losses by step, from metrics.jsonl (read through RunDir's checked loader)."""
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for row in RunDir(run_dir).read_metrics() or []:
        # a resumed run logs some steps twice: the later line is the one that counts
        for key, into in (("train_loss", train), ("eval_loss", evals)):
            if row.get(key) is not None:
                into[row["step"]] = float(row[key])
    return sorted(train.items()), sorted(evals.items())


def loss_svg(
    train: list[tuple[int, float]],
    evals: list[tuple[int, float]],
    title: str,
    *,
    labels: tuple[str, str] = ("training loss", "validation loss"),
    ylabel: str = "loss",
) -> str:
    """The loss curves (or any two per-step curves: ``labels``) as an inline ``<svg>`` element (text stays
    text, so it uses the page's font)."""
    import matplotlib
    import matplotlib.ticker
    from matplotlib.figure import Figure  # not pyplot: no global state, so the server may draw from any thread

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "codetune", "font.size": 10}):
        fig = Figure(figsize=(7.5, 3.4))
        ax = fig.subplots()
        if train:
            ax.plot(*zip(*train, strict=True), color="#2563eb", lw=1.6, label=labels[0])
        if evals:
            ax.plot(*zip(*evals, strict=True), color="#dc2626", lw=1.6, marker="o", ms=4, label=labels[1])
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(frameon=False)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})  # no date: the same run gives the same page
    svg = buf.getvalue()
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg[svg.index("<svg") :], count=1, flags=re.DOTALL)
    # scale with the page instead of matplotlib's fixed size in points
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="chart" role="img"', svg, count=1)


@dataclass
class Sample:
    suite: str
    task_id: str
    index: int  # which of the task's samples (n_samples > 1)
    tuned: dict
    base: dict | None

    @property
    def executed(self) -> bool:
        return self.tuned.get("verdict") is not None or "passed" in (self.tuned.get("scores") or {})

    @staticmethod
    def _passed(row: dict | None) -> bool | None:
        if row is None:
            return None
        scores = row.get("scores") or {}
        if "passed" in scores:
            return bool(scores["passed"])
        return row.get("verdict") == "passed" if row.get("verdict") is not None else None

    @property
    def passed(self) -> bool | None:
        return self._passed(self.tuned)

    @property
    def base_passed(self) -> bool | None:
        return self._passed(self.base)

    @property
    def change(self) -> str | None:
        """ "fixed" (the base failed, the fine-tune passes), "broke" (the reverse), else None."""
        if self.passed is None or self.base_passed is None or self.passed == self.base_passed:
            return None
        return "fixed" if self.passed else "broke"


def load_samples(eval_dir: Path) -> list[Sample]:
    """Every scored answer, paired with the base model's answer to the same prompt where there is one."""
    samples: list[Sample] = []
    for path in sorted(eval_dir.glob("*.jsonl")):
        suite = path.stem
        base_path = eval_dir / "base" / path.name
        base_rows: dict[tuple[str, int], dict] = {}
        if base_path.is_file():
            seen: dict[str, int] = {}
            for row in _read_rows(base_path):
                tid = str(row.get("task_id"))
                base_rows[(tid, seen.get(tid, 0))] = row
                seen[tid] = seen.get(tid, 0) + 1
        seen = {}
        for row in _read_rows(path):
            if not isinstance(row.get("task_id"), str):
                raise RecipeError(f"{path}, row {row['__row__']}, field 'task_id': missing or not text")
            tid = row["task_id"]
            index = seen.get(tid, 0)
            seen[tid] = index + 1
            samples.append(Sample(suite, tid, index, row, base_rows.get((tid, index))))
    order = {"fixed": 0, "broke": 1, None: 2}
    # what changed first, then executed verdicts before ROUGE-only rows; within a group, the files' order
    return sorted(samples, key=lambda s: (order[s.change], not s.executed))


# ---------------------------------------------------------------------------------------
# Rendering


def _fmt(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "—"


def _delta(tuned: Any, base: Any, digits: int) -> str:
    if not isinstance(tuned, int | float) or not isinstance(base, int | float):
        return "<td></td>"
    d = tuned - base
    cls = "up" if d > 0 else "down" if d < 0 else ""
    return f'<td class="num{" " + cls if cls else ""}">{d:+.{digits}f}</td>'


def eval_tables(summary: dict) -> str:
    results = summary.get("results") or {}
    if not isinstance(results, dict) or not results:
        return "<p>The evaluation summary has no results.</p>"
    models = list(results)
    tuned_name = "fine-tuned" if "fine-tuned" in results else models[0]
    compare = "base" in results and len(models) == 2
    head = "".join(f'<th class="num">{_e(m)}</th>' for m in models) + ("<th class=num>change</th>" if compare else "")
    parts = []
    suites: list[str] = []
    for m in models:
        for s in results[m] or {}:
            if s not in suites:
                suites.append(s)
    rouge_suites = [s for s in suites if any("rougeL" in (results[m].get(s) or {}) for m in models)]
    exec_suites = [s for s in suites if s not in rouge_suites]
    for s in rouge_suites:
        samples = (results[tuned_name].get(s) or {}).get("samples")
        rows = []
        for key in (*ROUGE_KEYS, "parse_rate"):
            vals = [(results[m].get(s) or {}).get(key) for m in models]
            if all(v is None for v in vals):
                continue
            cells = "".join(f'<td class="num">{_fmt(v, 2)}</td>' for v in vals)
            if compare:
                cells += _delta(vals[models.index(tuned_name)], vals[models.index("base")], 2)
            rows.append(f"<tr><td>{_e(key)}</td>{cells}</tr>")
        parts.append(
            f"<h3>{_e(s)}: ROUGE, F-measure x 100, mean over {_e(samples)} samples</h3>"
            f"<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
    if exec_suites:
        rows = []
        for s in exec_suites:
            keys = sorted({k for m in models for k in (results[m].get(s) or {}) if k.startswith("pass@")})
            for key in [*keys, "parse_rate"]:
                vals = [(results[m].get(s) or {}).get(key) for m in models]
                cells = "".join(f'<td class="num">{_fmt(v, 1)}</td>' for v in vals)
                if compare:
                    cells += _delta(vals[models.index(tuned_name)], vals[models.index("base")], 1)
                info = results[tuned_name].get(s) or {}
                tasks = f"{info['tasks']} tasks" if isinstance(info.get("tasks"), int) else ""
                if info.get("partial") and isinstance(info.get("tasks_in_suite"), int):
                    tasks = f"partial: {info['tasks']} of {info['tasks_in_suite']} tasks"
                elif info.get("missing_tasks"):  # summaries written before tasks_in_suite
                    tasks += f", partial: {info['missing_tasks']} missing"
                if info.get("held_out") is False:
                    tasks += ", not known to be held out"
                rows.append(f"<tr><td>{_e(s)}</td><td>{_e(tasks)}</td><td>{_e(key)}</td>{cells}</tr>")
        parts.append(
            "<h3>Executed tests: pass@k and parse rate, %</h3>"
            f"<table><thead><tr><th>suite</th><th>tasks</th><th>metric</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
    return "\n".join(parts)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        turns = [m for m in prompt if isinstance(m, dict)]
        if len(turns) == 1:
            return str(turns[0].get("content", ""))
        return "\n\n".join(f"[{m.get('role')}]\n{m.get('content', '')}" for m in turns)
    return "" if prompt is None else str(prompt)


def _badge(row: dict | None, passed: bool | None) -> str:
    if row is None:
        return '<span class="badge none">no answer</span>'
    if passed is None:
        score = (row.get("scores") or {}).get("rougeL")
        return f'<span class="badge none">ROUGE-L {_fmt(score, 1)}</span>'
    verdict = row.get("verdict") or ("passed" if passed else "failed")
    return f'<span class="badge {"pass" if passed else "fail"}">{_e(verdict)}</span>'


def _answer(label: str, row: dict | None, passed: bool | None) -> str:
    if row is None:
        return f'<div class="answer"><h4>{_e(label)}</h4><p class="muted">no answer to this prompt</p></div>'
    completion = row.get("completion") or ""
    code = row.get("code")
    parts = [f'<div class="answer"><h4>{_e(label)} {_badge(row, passed)}</h4>']
    parts.append(f'<div class="label">answer</div><pre>{_e(completion) or "<i>(empty)</i>"}</pre>')
    if code is not None and code.strip() != completion.strip():
        parts.append(f'<div class="label">extracted code</div><pre>{_e(code) or "<i>(none)</i>"}</pre>')
    if row.get("error"):
        parts.append(f'<div class="label">error</div><pre class="error">{_e(row["error"])}</pre>')
    parts.append("</div>")
    return "".join(parts)


def sample_html(s: Sample, has_base: bool) -> str:
    prompt = _prompt_text(s.tuned.get("prompt"))
    first = next((line for line in prompt.splitlines() if line.strip()), "")
    name = s.task_id + (f" #{s.index + 1}" if s.index else "")
    flags = {
        "suite": s.suite,
        "passed": "1" if s.passed is True else "0",
        "failed": "1" if s.passed is False else "0",
        "changed": "1" if s.change else "0",
    }
    attrs = " ".join(f'data-{k}="{_e(v)}"' for k, v in flags.items())
    change = f'<span class="badge {s.change}">{s.change}</span>' if s.change else ""
    verdicts = (_badge(s.base, s.base_passed) + " → " if has_base else "") + _badge(s.tuned, s.passed)
    reference = s.tuned.get("reference")
    answers = (_answer("base", s.base, s.base_passed) if has_base else "") + _answer("fine-tuned", s.tuned, s.passed)
    return (
        f'<details class="sample" {attrs}><summary><span class="tid">{_e(name)}</span>'
        f'<span class="suite">{_e(s.suite)}</span>{change}<span class="verdicts">{verdicts}</span>'
        f'<span class="first">{_e(first[:140])}</span></summary>'
        f'<div class="body"><div class="label">prompt</div><pre>{_e(prompt)}</pre>'
        + (
            f'<details class="ref"><summary>reference answer</summary><pre>{_e(reference)}</pre></details>'
            if reference
            else ""
        )
        + f'<div class="answers {"two" if has_base else ""}">{answers}</div></div></details>'
    )


# ---------------------------------------------------------------------------------------
# The page


@functools.cache
def _asset(name: str) -> str:
    """A file of ``codetune/report_assets`` (package data): the page's template, stylesheet or script."""
    return (resources.files("codetune.report_assets") / name).read_text(encoding="utf-8")


def _csp(script: str, connect: bool = False) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:"
    return policy + ("; connect-src 'self'" if connect else "")


def page(title: str, body: str, script: str, *, connect: bool = False) -> str:
    """One HTML document in the report's style (``page.html`` with ``report.css``) whose Content-Security-Policy
    admits ``script``, by its hash, and nothing else (``connect``: it may also call its own origin). The page
    links a ``data:`` icon, so a browser asks the server for no favicon (no 404 in the console when served)."""
    return Template(_asset("page.html")).substitute(
        csp=_csp(script, connect), title=_e(title), css=_asset("report.css"), body=body, script=script
    )


# ---------------------------------------------------------------------------------------
# The report, section by section


def _check_reportable(run_dir: Path) -> Path | None:
    """The run's evaluation folder (or None); refuses a folder with nothing to report."""
    if not run_dir.is_dir():
        raise RecipeError(f"no such run directory: {run_dir}")
    eval_dir = eval_dir_of(run_dir)
    if eval_dir is None and not RunDir(run_dir).metrics.is_file():
        raise RecipeError(
            f"{run_dir} has neither {RunDir.METRICS} nor {RunDir.EVAL}/: nothing to report "
            "(train or evaluate it first)"
        )
    return eval_dir


def _recipe_names(run_dir: Path) -> tuple[str, str | None]:
    """The recipe's name (else the folder's) and the base model, from the run's recipe file if it has one."""
    recipe_yaml = RunDir(run_dir).recipe_file
    recipe_name, base_model = run_dir.name, None
    if recipe_yaml.is_file():
        import yaml

        try:
            raw = yaml.safe_load(recipe_yaml.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{recipe_yaml}: not valid YAML ({exc})") from None
        if isinstance(raw, dict):
            recipe_name = raw.get("name") or recipe_name
            base_model = (raw.get("model") or {}).get("name_or_path") if isinstance(raw.get("model"), dict) else None
    return recipe_name, base_model


def _header(run_dir: Path, recipe_name: str, base_model: str | None, train_summary: dict, chat_link: bool) -> str:
    """The page's header: which run, its base model and its training in numbers; it opens <main>."""
    facts = [f"run <code>{_e(run_dir.resolve())}</code>"]
    if base_model:
        facts.append(f"base model <b>{_e(base_model)}</b>")
    if train_summary:
        facts.append(f"{_e(train_summary.get('global_step'))} steps")
        if isinstance(train_summary.get("tokens"), int):
            facts.append(f"{train_summary['tokens']:,} tokens")
        if isinstance(train_summary.get("wall_s_this_session"), int | float):
            facts.append(f"{train_summary['wall_s_this_session']:.0f} s")
        if isinstance(train_summary.get("trainable_parameters"), int):
            facts.append(f"{train_summary['trainable_parameters']:,} trainable parameters")
    nav = ' · <a href="/chat">chat with the model</a>' if chat_link else ""
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"<header><h1>codetune report: {_e(recipe_name)}</h1>"
        f'<div class="facts">{" · ".join(facts)}{nav}</div>'
        f'<div class="facts">written {generated}</div></header><main>'
    )


def _loss_section(run_dir: Path, recipe_name: str) -> list[str]:
    train, evals = _loss_points(run_dir)
    parts = ["<section id=loss><h2>Loss</h2>"]
    if train or evals:
        last = []
        if train:
            last.append(f"last training loss {train[-1][1]:.4f} (step {train[-1][0]})")
        if evals:
            last.append(f"last validation loss {evals[-1][1]:.4f} (step {evals[-1][0]})")
        try:
            chart = loss_svg(train, evals, f"{recipe_name}: loss")
        except (ValueError, OverflowError):  # losses too far apart for matplotlib's axes (1e308 and -1e308)
            chart = f'<p class="muted">The losses in {RunDir.METRICS} span too wide a range to draw.</p>'
        parts.append(chart + f'<p class="muted">{_e(", ".join(last))}</p>')
    else:
        parts.append(f'<p class="muted">No training metrics here ({RunDir.METRICS}).</p>')
    parts.append("</section>")
    return parts


def _eval_section(summary: dict | None) -> list[str]:
    parts = ["<section id=eval><h2>Evaluation</h2>"]
    if summary is not None:
        parts.append(eval_tables(summary))
    else:
        parts.append('<p class="muted">Not evaluated yet: run <code>codetune eval RUN_DIR</code>.</p>')
    parts.append("</section>")
    return parts


def _sample_controls(samples: list[Sample], has_base: bool) -> str:
    """The filters over the samples: a button per verdict (with its count), the suite and a search box."""
    counts = {
        "all": len(samples),
        "passed": sum(s.passed is True for s in samples),
        "failed": sum(s.passed is False for s in samples),
        "changed": sum(bool(s.change) for s in samples),
    }
    buttons = "".join(
        f'<button type=button data-filter="{k}" class="{"on" if k == "all" else ""}">'
        f"{k} <span class=muted>{v}</span></button>"
        for k, v in counts.items()
        if k != "changed" or has_base
    )
    suites = sorted({s.suite for s in samples})
    options = '<option value="all">all suites</option>' + "".join(
        f'<option value="{_e(s)}">{_e(s)}</option>' for s in suites
    )
    return (
        f'<div class="controls">{buttons}<select id="suite" aria-label="suite">{options}</select>'
        '<input id="search" type=search placeholder="search task or text" aria-label="search">'
        '<span id="shown"></span></div>'
    )


def _samples_section(samples: list[Sample]) -> list[str]:
    parts = ["<section id=samples><h2>Samples</h2>"]
    if samples:
        has_base = any(s.base is not None for s in samples)
        if has_base:
            fixed = sum(s.change == "fixed" for s in samples)
            broke = sum(s.change == "broke" for s in samples)
            parts.append(
                f'<p class="muted">Against the base model the fine-tune fixed {fixed} and broke {broke} '
                "sample(s), listed first. passed / failed: the fine-tuned model's verdict; changed: "
                "the verdict differs from the base model's.</p>"
            )
        parts.append(_sample_controls(samples, has_base) + '<div id="list">')
        parts.extend(sample_html(s, has_base) for s in samples)
        parts.append("</div>")
    else:
        parts.append(f'<p class="muted">No scored samples ({RunDir.EVAL}/SUITE.jsonl).</p>')
        # the filter script expects its controls; give it inert ones rather than a second script
        parts.append(
            '<div class="controls" hidden><select id="suite"><option value="all"></option></select>'
            '<input id="search"><span id="shown"></span></div>'
        )
    parts.append("</section>")
    return parts


def _rl_section(run_dir: Path, summary: dict | None) -> list[str]:
    """GRPO after SFT (``codetune rl``), when the run has it: the reward per step beside the held-back tests'
    pass rate (a gap between them is a policy learning the visible tests), the verdicts, and pass@1 after SFT
    beside after GRPO (rl/eval/, only when made from the rl/adapter there now)."""
    rd = RunDir(run_dir, stage="rl")
    if not rd.rl_metrics.is_file():
        return []
    rows = []
    for line in rd.rl_metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill: the others still draw
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    num = (int, float)
    reward = [(r["step"], float(r["reward"])) for r in rows if isinstance(r.get("reward"), num)]
    held = [(r["step"], float(r["heldback_pass_rate"])) for r in rows if isinstance(r.get("heldback_pass_rate"), num)]
    parts = ["<section id=rl><h2>Reinforcement learning (GRPO)</h2>"]
    if reward or held:
        try:
            parts.append(loss_svg(reward, held, "GRPO: reward per step", labels=("reward (mean)", "held-back tests passed"),
                                  ylabel="share"))
        except (ValueError, OverflowError):
            parts.append('<p class="muted">The rewards span too wide a range to draw.</p>')
    rewarded = [float(r["rewarded_pass_rate"]) for r in rows if isinstance(r.get("rewarded_pass_rate"), num)]
    if rewarded and held:
        gap = sum(rewarded) / len(rewarded) - sum(v for _, v in held) / len(held)
        parts.append(f'<p>Rewarded tests passed minus held-back tests passed, mean over the steps: {gap:+.3f}</p>')
    verdicts: dict[str, int] = {}
    for r in (r for r in rows if isinstance(r.get("verdicts"), dict)):
        for k, v in r["verdicts"].items():
            verdicts[str(k)] = verdicts.get(str(k), 0) + (v if isinstance(v, int) else 0)
    if verdicts:
        parts.append("<p>Verdicts: " + _e(", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))) + "</p>")
    parts += _rl_scores(rd, summary)
    parts.append("</section>")
    return parts


def _rl_scores(rd: RunDir, summary: dict | None) -> list[str]:
    rl_eval = read_eval_summary(rd.eval_summary) if rd.eval_summary.is_file() else None
    current = rd.adapter_fingerprint()
    if not rl_eval or current is None or rl_eval.get("adapter_sha256") != current:
        return ['<p class="muted">Not evaluated after GRPO: run <code>codetune eval RUN_DIR --adapter rl</code>.</p>']
    after = rl_eval["results"].get("fine-tuned") or {}
    before = ((summary or {}).get("results") or {}).get("fine-tuned") or {}
    rows = [
        f"<tr><td>{_e(suite)}</td><td>{_fmt(before.get(suite, {}).get('pass@1'), 2)}</td>"
        f"<td>{_fmt(info.get('pass@1'), 2)}</td></tr>"
        for suite, info in after.items()
        if isinstance(info, dict) and "pass@1" in info
    ]
    if not rows:
        return []
    return ["<table><tr><th>suite</th><th>pass@1 after SFT</th><th>pass@1 after GRPO</th></tr>", *rows, "</table>"]


def render_report(run_dir: str | Path, *, chat_link: bool = False) -> str:
    """The report of ``run_dir`` as one HTML document."""
    run_dir = Path(run_dir)
    eval_dir = _check_reportable(run_dir)
    recipe_name, base_model = _recipe_names(run_dir)
    train_summary = RunDir(run_dir).read_train_summary() or {}
    summary = read_eval_summary(eval_dir / EVAL_SUMMARY) if eval_dir else None
    parts = [_header(run_dir, recipe_name, base_model, train_summary, chat_link)]
    parts += _loss_section(run_dir, recipe_name)
    parts += _eval_section(summary)
    parts += _rl_section(run_dir, summary)
    parts += _samples_section(load_samples(eval_dir) if eval_dir else [])
    parts.append("</main>")
    return page(f"codetune report: {recipe_name}", "\n".join(parts), _asset("report.js"))


def write_report(run_dir: str | Path, out: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``) as ``card`` writes its card: an existing file is replaced only
    with ``overwrite``, and only when it is a report codetune wrote; the new one is staged and renamed into
    place, so an earlier report stays whole until the new one is, and a full disk is one error naming it."""
    run_dir = Path(run_dir)
    path = Path(out) if out is not None else RunDir(run_dir).report
    elsewhere = "choose another --out"
    if path.is_dir() and not path.is_symlink():
        hint = f"--out takes the path of the HTML file to write (say {path / 'index.html'})"
        raise OutputError(f"report {path} is a folder: {hint if out is not None else 'move it away, or ' + elsewhere}")
    rules = dict(overwrite=overwrite, protect=[run_dir], ours=is_report, what="report", elsewhere=elsewhere)
    check_target(path, "report", **rules)
    text = render_report(run_dir)
    with staged_file(path, "report", **rules) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
