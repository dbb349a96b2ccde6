"""Does GRPO on executed tests make the tiny model better, and better than more SFT would? (issue 20, point 5)

For each training seed, on `tiny-cpu-rl` (tiny-cpu's SFT, then GRPO on fresh members of the taught task
families, rewarded by the sandbox's verdict), four arms scored on the same held-out tasks:

- base: the tiny model without an adapter (the same under every seed: scored once);
- sft: the SFT adapter;
- rl: SFT, then GRPO (`rl/adapter`);
- control: SFT, then as much more SFT (`lora.init_from` the SFT adapter) on the prompts GRPO trained on, with
  their reference answers: the same number of trained sequences as GRPO's completions
  (rl.max_steps x rl.prompts_per_step x rl.num_generations, one sequence a row, no packing).

Held-out: `starter-fresh` (220 fresh members of the taught families, none a starter row, none an RL task)
greedy, and pass@1 from --samples completions per task (the unbiased estimator; temperature 0.5, GRPO's);
`starter-family`, `starter-novel` and ROUGE-L greedy for base, sft and rl (the control's run has no starter
training split to hold these out from).
The paired per-task bootstrap resamples tasks and averages the per-task differences over seeds.
The held-back tests' pass rate beside the rewarded ones' comes from GRPO's own log (rl/metrics.jsonl).

    python benchmarks/rl_gain.py                    # seeds 1 2 3, 16 samples: hours on 2 cores
    python benchmarks/rl_gain.py --seed 1 --samples 0   # greedy only
    python benchmarks/rl_gain.py --table            # gather what benchmarks/results/rl_gain/ holds
    python benchmarks/rl_gain.py --rescore --root DIR --samples 16   # sampled pass@1 again, from DIR's runs

Each seed's arms write benchmarks/results/rl_gain/seed<N>.json (--out); the table and the intervals go to
benchmarks/results/rl_gain.json (the --out folder's name, .json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEEDS = (1, 2, 3)
RECIPE = "tiny-cpu-rl"
QUIET = ["training.eval_steps=null", "training.save_strategy=no"]  # neither changes a weight
# base, sft and rl; the control only starter-fresh (its run has no starter split: nothing to hold out from)
SUITES = ["starter-fresh", "starter-family", "starter-novel", "rouge"]


def _eval(source, suites, recipe, out, samples: int) -> dict[str, dict]:
    """Greedy scores of ``suites``, and with ``samples`` > 0 pass@1 from that many sampled completions."""
    from codetune.evaluate import evaluate
    from codetune.recipe import load_recipe

    greedy = evaluate(source, suites, recipe=recipe, out_dir=out / "greedy", compare_base=False)["results"]
    scores = {s: _score(r) for s, r in greedy["fine-tuned"].items()}
    per_task = {s: _per_task(out / "greedy" / f"{s}.jsonl") for s in suites if s != "rouge"}
    arm = {"scores": scores, "per_task": per_task}
    if samples:
        _sampled(arm, source, recipe, out, samples)
    return arm


def _sampled(arm: dict, source, recipe, out: Path, samples: int) -> None:
    """pass@1 on starter-fresh from ``samples`` completions per task at GRPO's temperature, into ``arm``."""
    from codetune.evaluate import evaluate
    from codetune.recipe import load_recipe

    sampled_recipe = load_recipe(
        recipe,
        [f"evaluation.n_samples={samples}", "generation.do_sample=true", "generation.temperature=0.5", "evaluation.k=[1]"],
    )
    res = evaluate(source, ["starter-fresh"], recipe=sampled_recipe, out_dir=out / "sampled", compare_base=False, overwrite=True)
    arm["scores"]["starter-fresh"]["sampled"] = res["results"]["fine-tuned"]["starter-fresh"]["pass@1"]
    arm["per_task"]["starter-fresh sampled"] = _per_task(out / "sampled" / "starter-fresh.jsonl")


def rescore(row: dict, root: Path, samples: int) -> dict:
    """A seed's sampled pass@1 again, with ``samples`` completions per task, from the runs ``seed_run`` left in
    ``root`` (the adapters are not trained again)."""
    from codetune.recipe import load_recipe
    from codetune.source import Source

    run = root / f"seed-{row['seed']}"
    recipe = load_recipe(run / "recipe.yaml")
    sources = {"sft": (run, run / "bench-sft"), "rl": (Source.of(run, stage="rl"), run / "bench-rl")}
    sources["control"] = (root / f"control-{row['seed']}" / "control", root / f"control-{row['seed']}" / "control" / "bench")
    for arm, (source, out) in sources.items():
        _sampled(row["arms"][arm], source, recipe, out, samples)
    row["samples"] = samples
    return row


def _score(result: dict) -> dict:
    """pass@1 of an executed suite; ROUGE-L for rouge."""
    if "pass@1" in result:
        return {"greedy": result["pass@1"], "tasks": result["tasks"]}
    return {"greedy_rougeL": result["rougeL"], "samples": result.get("samples")}


def _per_task(path: Path) -> dict[str, float]:
    """Each task's share of passing completions in an eval's per-sample lines."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    passed: dict[str, list[int]] = {}
    for r in rows:
        passed.setdefault(r["task_id"], []).append(r["verdict"] == "passed")
    return {t: sum(v) / len(v) for t, v in passed.items()}


def _control(recipe, run: Path, out: Path, seed: int, settings: list[str]) -> tuple[Path, float]:
    """More SFT from the SFT adapter on GRPO's prompts (the tasks its filter kept) with their reference answers."""
    from codetune.pipeline import train
    from codetune.recipe import load_recipe
    from codetune.rl import filter_kept, rl_tasks
    from codetune.rundir import RunDir

    tasks = rl_tasks(recipe, run)
    kept = filter_kept(tasks, RunDir(run))
    tasks = kept if kept is not None else tasks  # no filter: GRPO trained on every task
    rows = [{"instruction": t.task.prompt[0]["content"], "input": "", "output": t.task.reference} for t in tasks]
    out.mkdir(parents=True, exist_ok=True)
    data = out / "control.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = recipe.rl
    sequences = cfg.max_steps * cfg.prompts_per_step * cfg.num_generations
    steps = -(-sequences // recipe.training.batch_size)
    control_recipe = load_recipe(
        RECIPE,
        [
            *QUIET,
            *settings,
            f"training.seed={seed}",
            f"data.source={data}",
            "data.split.test_size=1",  # one row aside: the split needs a test row
            "data.packing=false",
            "data.decontaminate=[test]",
            f"lora.init_from={run / 'adapter'}",
            f"training.max_steps={steps}",
            f"training.learning_rate={cfg.learning_rate}",
            "training.warmup_ratio=0.0",
        ],
    )
    control_recipe = control_recipe.model_copy(update={"rl": None})
    t0 = time.perf_counter()
    train(control_recipe, out / "control")
    return out / "control", time.perf_counter() - t0


def _gap(run: Path) -> dict:
    """The rewarded and held-back tests' pass rates over GRPO's steps (rl/metrics.jsonl)."""
    from codetune.rundir import RunDir

    rows = [json.loads(line) for line in RunDir(run).rl_metrics.read_text().splitlines() if line.strip()]
    both = [r for r in rows if r.get("rewarded_pass_rate") is not None and r.get("heldback_pass_rate") is not None]
    if not both:
        return {}
    rewarded = sum(r["rewarded_pass_rate"] for r in both) / len(both)
    held = sum(r["heldback_pass_rate"] for r in both) / len(both)
    return {"rewarded_pass_rate": 100 * rewarded, "heldback_pass_rate": 100 * held, "gap": 100 * (rewarded - held)}


def seed_run(seed: int, root: Path, samples: int, score_base: bool, settings: list[str] = ()) -> dict:
    from codetune.evaluate import evaluate
    from codetune.pipeline import train
    from codetune.recipe import load_recipe
    from codetune.rl import rl
    from codetune.source import Source

    recipe = load_recipe(RECIPE, [*QUIET, *settings, f"training.seed={seed}"])
    run = root / f"seed-{seed}"
    times = {}
    t0 = time.perf_counter()
    train(recipe, run)
    times["sft_s"] = time.perf_counter() - t0
    arms = {"sft": _eval(run, SUITES, recipe, run / "bench-sft", samples)}
    if score_base:
        base = evaluate(run, SUITES, recipe=recipe, out_dir=run / "bench-base", compare_base=True)
        arms["base"] = {
            "scores": {s: _score(r) for s, r in base["results"]["base"].items()},
            "per_task": {s: _per_task(run / "bench-base" / "base" / f"{s}.jsonl") for s in SUITES if s != "rouge"},
        }
    t0 = time.perf_counter()
    result = rl(recipe, run)
    times["rl_s"] = time.perf_counter() - t0
    arms["rl"] = _eval(Source.of(run, stage="rl"), SUITES, recipe, run / "bench-rl", samples)
    control, times["control_s"] = _control(recipe, run, root / f"control-{seed}", seed, list(settings))
    arms["control"] = _eval(control, ["starter-fresh"], recipe, control / "bench", samples)
    return {
        "seed": seed,
        "samples": samples,
        "rl_tasks_kept": result.tasks,
        "rl_steps": result.steps,
        "times": {k: round(v, 1) for k, v in times.items()},
        "rewarded_vs_heldback": _gap(run),
        "arms": arms,
    }


def bootstrap(rows: list[dict], a: str, b: str, key: str, n: int = 10_000, seed: int = 0) -> dict | None:
    """Mean over seeds of arm ``a`` minus arm ``b`` per task on ``key`` ("starter-fresh" or "starter-fresh
    sampled"), in points, with a 95% interval from resampling tasks (the same tasks in every seed: paired)."""
    pairs = [(r["arms"][a]["per_task"].get(key), r["arms"][b]["per_task"].get(key)) for r in rows if a in r["arms"] and b in r["arms"]]
    pairs = [(x, y) for x, y in pairs if x and y]
    if not pairs:
        return None
    tasks = sorted(set.intersection(*(set(x) & set(y) for x, y in pairs)))
    diff = [sum(x[t] - y[t] for x, y in pairs) / len(pairs) for t in tasks]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(diff) for _ in diff) / len(diff) for _ in range(n))
    return {
        "mean": round(100 * sum(diff) / len(diff), 2),
        "interval_95": [round(100 * means[int(0.025 * n)], 2), round(100 * means[int(0.975 * n) - 1], 2)],
        "tasks": len(tasks),
        "seeds": len(pairs),
    }


def table(rows: list[dict]) -> tuple[str, dict]:
    base = next((r["arms"]["base"] for r in rows if "base" in r["arms"]), None)
    lines = [
        "| seed | base | sft | rl | control | rl - sft | rl - control | rewarded / held-back tests (GRPO's log) | RL s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(arm, metric="greedy"):
        return f"{arm['scores']['starter-fresh'].get(metric, float('nan')):.1f}" if arm else "-"

    for r in sorted(rows, key=lambda r: r["seed"]):
        a = r["arms"]
        g = r["rewarded_vs_heldback"]
        lines.append(
            f"| {r['seed']} | {cell(base)} | {cell(a['sft'])} | {cell(a['rl'])} | {cell(a['control'])} | "
            f"{a['rl']['scores']['starter-fresh']['greedy'] - a['sft']['scores']['starter-fresh']['greedy']:+.1f} | "
            f"{a['rl']['scores']['starter-fresh']['greedy'] - a['control']['scores']['starter-fresh']['greedy']:+.1f} | "
            f"{g.get('rewarded_pass_rate', float('nan')):.1f} / {g.get('heldback_pass_rate', float('nan')):.1f} | "
            f"{r['times']['rl_s']:.0f} |"
        )
    gathered = {
        "recipe": RECIPE,
        "heldout_tasks": rows[0]["arms"]["sft"]["scores"]["starter-fresh"]["tasks"] if rows else 0,
        "per_seed": {
            r["seed"]: {
                arm: {s: v for s, v in data["scores"].items()} for arm, data in {**r["arms"], **({"base": base} if base else {})}.items()
            }
            | {"rewarded_vs_heldback": r["rewarded_vs_heldback"], "times": r["times"], "rl_tasks_kept": r["rl_tasks_kept"]}
            for r in rows
        },
        "intervals": {
            f"{a} - {b} ({key})": bootstrap(rows, a, b, key)
            for a, b in (("rl", "sft"), ("rl", "control"), ("control", "sft"))
            for key in ("starter-fresh", "starter-fresh sampled")
        },
    }
    return "\n".join(lines), gathered


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, action="append", help="default: 1 2 3")
    ap.add_argument("--samples", type=int, default=16, help="completions per task for sampled pass@1 (0: greedy only)")
    ap.add_argument("--root", type=Path, default=None, help="where the runs go (default: a folder under /tmp)")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe setting for every arm (a smoke run: --set training.max_steps=20 ...)")
    ap.add_argument("--table", action="store_true", help="only gather what the results folder holds")
    ap.add_argument("--rescore", action="store_true",
                    help="score the sampled pass@1 again with --samples, from the runs in --root (nothing trained)")
    ap.add_argument("--out", type=Path, default=RESULTS / "rl_gain")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rescore:
        for seed in args.seed or SEEDS:
            path = args.out / f"seed{seed}.json"
            row = rescore(json.loads(path.read_text()), args.root, args.samples)
            path.write_text(json.dumps(row, indent=2) + "\n")
            print(f"seed {seed}: " + ", ".join(f"{k} {v['scores']['starter-fresh'].get('sampled', float('nan')):.1f}" for k, v in row["arms"].items()), flush=True)
    elif not args.table:
        import tempfile

        root = args.root or Path(tempfile.mkdtemp(prefix="rl-gain-"))
        for seed in args.seed or SEEDS:
            row = seed_run(seed, root, args.samples, score_base=seed == (args.seed or SEEDS)[0], settings=args.settings)
            row["settings"] = args.settings
            row.update(threads=os.environ.get("OMP_NUM_THREADS"), machine=platform.machine(),
                       measured=datetime.now(UTC).isoformat(timespec="seconds"))
            (args.out / f"seed{seed}.json").write_text(json.dumps(row, indent=2) + "\n")
            print(f"seed {seed}: " + ", ".join(f"{k} {v['scores']['starter-fresh']['greedy']:.1f}" for k, v in row["arms"].items()), flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(args.out.glob("seed*.json"))]
    text, gathered = table(rows)
    print(text)
    print(json.dumps(gathered["intervals"], indent=2))
    (args.out.parent / f"{args.out.name}.json").write_text(json.dumps(gathered, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
