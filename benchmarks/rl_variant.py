"""A GRPO variant from an SFT run that benchmarks/rl_gain.py trained: is a setting worth three seeds?

Copies ``ROOT/seed-N`` (its SFT adapter, data and recipe; not its GRPO), runs GRPO with the recipe's `rl:`
section changed by --set, and scores the new adapter as rl_gain.py scores its arms on `starter-fresh`:
greedy, and pass@1 from --samples completions per task at temperature 0.5. Compare with the same seed's
`sft` and `rl` rows in benchmarks/results/rl_gain/seedN.json.

    python benchmarks/rl_variant.py --root /tmp/rl-gain-xyz --seed 1 --name fmt --set rl.format_reward=0.2

Writes benchmarks/results/rl_variants/NAME-seedN.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rl_gain  # noqa: E402  (beside this file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="rl_gain.py's --root: holds seed-N/")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--name", required=True, help="the variant's name (its folder and result file)")
    ap.add_argument("--samples", type=int, default=8, help="completions per task for sampled pass@1 (0: greedy only)")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="rl.KEY=VALUE")
    ap.add_argument("--out", type=Path, default=rl_gain.RESULTS / "rl_variants")
    args = ap.parse_args(argv)
    if not args.settings or any(not s.startswith("rl.") for s in args.settings):
        ap.error("give the variant as --set rl.KEY=VALUE items (rl.* only: the SFT run is kept)")

    from codetune.recipe import load_recipe
    from codetune.rl import rl
    from codetune.source import Source

    sft = args.root / f"seed-{args.seed}"
    run = args.root / f"{args.name}-{args.seed}"
    if not (run / "adapter").exists():
        shutil.copytree(sft, run, ignore=shutil.ignore_patterns("rl", "bench-*", "checkpoints"))
    recipe = load_recipe(run / "recipe.yaml", args.settings)
    t0 = time.perf_counter()
    result = rl(recipe, run)
    rl_s = time.perf_counter() - t0
    arm = rl_gain._eval(Source.of(run, stage="rl"), ["starter-fresh"], recipe, run / "bench-rl", args.samples)
    row = {
        "seed": args.seed,
        "name": args.name,
        "settings": args.settings,
        "samples": args.samples,
        "rl_tasks_kept": result.tasks,
        "rl_s": round(rl_s, 1),
        "starter-fresh": arm["scores"]["starter-fresh"],
        "rewarded_vs_heldback": rl_gain._gap(run),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "measured": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}-seed{args.seed}.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
