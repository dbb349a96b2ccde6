"""What each tiny family learns from the demo's recipe: `tiny-cpu` with only model.name_or_path swapped to
``builtin:tiny-<family>``, per training seed, scored on the held-out starter-family tasks (pass@1, greedy)
against the family's base (scored once: the base is the same model under every seed).

    python benchmarks/family_parity.py                          # every tiny family, seeds 1 2 3
    python benchmarks/family_parity.py --family qwen2 --seed 2  # one job (run two at a time on 2 cores)
    python benchmarks/family_parity.py --table                  # the table of what is in the results folder

Each (family, seed) writes benchmarks/results/family_parity/<family>-seed<N>.json; the table and
benchmarks/results/family_parity.json gather them. tests/test_family_parity.py asserts the same claim (gain
>= 30 points for every seed) by running the same function.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEEDS = (1, 2, 3)


def parity_run(family: str, seed: int, root: Path, *, score_base: bool) -> dict:
    """tiny-cpu on ``builtin:tiny-<family>`` with ``seed``, trained into ``root`` and scored on starter-family."""
    from codetune.evaluate import evaluate
    from codetune.pipeline import train
    from codetune.recipe import load_recipe

    recipe = load_recipe(
        "tiny-cpu",
        [
            f"model.name_or_path=builtin:tiny-{family}",
            f"training.seed={seed}",
            "training.eval_steps=null",  # no mid-run eval, no checkpoints: neither changes a weight
            "training.save_strategy=no",
        ],
    )
    run = root / f"{family}-seed-{seed}"
    t0 = time.perf_counter()
    train(recipe, run)
    train_s = time.perf_counter() - t0
    results = evaluate(run, ["starter-family"], recipe=recipe, compare_base=score_base)["results"]
    summary = json.loads((run / "train_summary.json").read_text())
    from codetune.families import family_named

    return {
        "family": family,
        "tiny_version": family_named(family).tiny.version,
        "seed": seed,
        "run": str(run),
        "steps": summary["global_step"],
        "final_loss": round(summary["last_train_loss"], 4),
        "train_s": round(train_s, 1),
        "tasks": results["fine-tuned"]["starter-family"]["tasks"],
        "fine_tuned_pass@1": results["fine-tuned"]["starter-family"]["pass@1"],
        "base_pass@1": results["base"]["starter-family"]["pass@1"] if score_base else None,
    }


def table(rows: list[dict]) -> tuple[str, dict]:
    by_family: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["family"], r["seed"])):
        by_family.setdefault(r["family"], []).append(r)
    lines = [
        "| family | seeds | base pass@1 | fine-tuned pass@1 per seed | min gain | steps | train s (1 thread) |",
        "|---|---|---|---|---|---|---|",
    ]
    gathered = {}
    for family, runs in by_family.items():
        base = next((r["base_pass@1"] for r in runs if r["base_pass@1"] is not None), None)
        tuned = [r["fine_tuned_pass@1"] for r in runs]
        gain = min(tuned) - base if base is not None else None
        gathered[family] = {"base": base, "fine_tuned": {r["seed"]: r["fine_tuned_pass@1"] for r in runs},
                            "min_gain": gain, "runs": runs}
        lines.append(
            f"| {family} | {','.join(str(r['seed']) for r in runs)} | {base if base is not None else '-'} | "
            f"{' / '.join(f'{t:.1f}' for t in tuned)} | {f'{gain:.1f}' if gain is not None else '-'} | "
            f"{runs[0]['steps']} | {' / '.join(str(round(r['train_s'])) for r in runs)} |"
        )
    return "\n".join(lines), gathered


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", action="append", help="default: every family with a tiny builtin")
    ap.add_argument("--seed", type=int, action="append", help="default: 1 2 3")
    ap.add_argument("--table", action="store_true", help="only gather what the results folder holds")
    ap.add_argument("--out", type=Path, default=RESULTS / "family_parity")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        from codetune.families import families

        names = args.family or [n for n, f in families().items() if f.tiny]
        for family in names:
            for seed in args.seed or SEEDS:
                with tempfile.TemporaryDirectory() as tmp:
                    row = parity_run(family, seed, Path(tmp), score_base=seed == SEEDS[0])
                row.update(threads=os.environ.get("OMP_NUM_THREADS"), machine=platform.machine(),
                           measured=datetime.now(UTC).isoformat(timespec="seconds"))
                row.pop("run")
                (args.out / f"{family}-seed{seed}.json").write_text(json.dumps(row, indent=2) + "\n")
                print(f"{family} seed {seed}: {row['fine_tuned_pass@1']:.1f} (base {row['base_pass@1']})", flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(args.out.glob("*-seed*.json"))]
    text, gathered = table(rows)
    print(text)
    (RESULTS / "family_parity.json").write_text(json.dumps(gathered, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
