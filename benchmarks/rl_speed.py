"""GRPO's step time with TRL's own generation against codetune's batched generation (``rl.rollouts``), on
the same run, prompts, generations and seed, alternating, and where each step's time goes: generating,
scoring (the sandbox), and the rest (log-probabilities, the loss, the optimizer step).

    python benchmarks/rl_speed.py --run runs/tiny-cpu              # 2 rounds x 5 steps per path
    python benchmarks/rl_speed.py --run runs/tiny-cpu --rounds 3 --steps 8

The run must be a trained one (`codetune run tiny-cpu` makes runs/tiny-cpu): an untrained model rarely
stops, and every completion would run to max_completion_length. Each round copies the run into a scratch
folder and runs `codetune rl` there; the run itself is not touched.

Prints a table and writes JSON (default benchmarks/results/rl_speed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("trl", "codetune")


class Timers:
    """Seconds spent generating and scoring, wrapped around TRL's ``_generate`` and codetune's reward."""

    def __init__(self):
        self.generate = self.score = 0.0

    def install(self):
        import trl.trainer.grpo_trainer as grpo

        import codetune.reward as reward

        timers = self
        original_generate, original_score = grpo.GRPOTrainer._generate, reward.score

        def timed_generate(trainer, prompts):
            t0 = time.perf_counter()
            try:
                return original_generate(trainer, prompts)
            finally:
                timers.generate += time.perf_counter() - t0

        def timed_score(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original_score(*args, **kwargs)
            finally:
                timers.score += time.perf_counter() - t0

        grpo.GRPOTrainer._generate = timed_generate
        reward.score = timed_score


def one(run: Path, path: str, settings: list[str], timers: Timers) -> dict:
    from codetune.recipe import load_recipe
    from codetune.rl import rl

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("rl", "checkpoints", "eval", "merged"))
        recipe = load_recipe(copy / "recipe.yaml", [*settings, f"rl.rollouts={path}"])
        timers.generate = timers.score = 0.0
        t0 = time.perf_counter()
        result = rl(recipe, copy)
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (copy / "rl" / "metrics.jsonl").read_text().splitlines()]
    train_wall = result.wall_s
    steps = result.steps
    return {
        "rollouts": path,
        "steps": steps,
        "s_per_step": train_wall / steps,
        "generate_s_per_step": timers.generate / steps,
        "score_s_per_step": timers.score / steps,
        "rest_s_per_step": (train_wall - timers.generate - timers.score) / steps,
        "mean_completion_tokens": sum(x.get("completions/mean_length", 0) for x in lines) / len(lines),
        "clipped_ratio": sum(x.get("completions/clipped_ratio", 0) for x in lines) / len(lines),
        "mean_reward": sum(x.get("reward", 0) for x in lines) / len(lines),
        "wall_s_with_load": round(wall, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "tiny-cpu")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-completion-length", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rl_speed.json")
    args = ap.parse_args(argv)
    if not (args.run / "adapter" / "adapter_config.json").is_file():
        print(f"error: {args.run} is not a trained run (run `codetune run tiny-cpu` first)", file=sys.stderr)
        return 2
    settings = [
        f"rl.max_steps={args.steps}",
        f"rl.num_generations={args.generations}",
        f"rl.prompts_per_step={args.prompts}",
        f"rl.max_completion_length={args.max_completion_length}",
        f"rl.temperature={args.temperature}",
        "rl.seed=7",
    ]
    timers = Timers()
    timers.install()
    rows = []
    for r in range(args.rounds):
        for path in PATHS if r % 2 == 0 else reversed(PATHS):
            row = one(args.run, path, settings, timers)
            row["round"] = r
            rows.append(row)
            print(f"round {r} {path:8s} {row['s_per_step']:.2f} s/step", flush=True)
    mean = {p: {k: sum(x[k] for x in rows if x["rollouts"] == p) / args.rounds for k in rows[0]
                if isinstance(rows[0][k], float)} for p in PATHS}
    print("| rollouts | s/step | generating | scoring | the rest | completion tokens | clipped |")
    print("|---|---|---|---|---|---|---|")
    for p in PATHS:
        m = mean[p]
        print(f"| {p} | {m['s_per_step']:.2f} | {m['generate_s_per_step']:.2f} | {m['score_s_per_step']:.2f} | "
              f"{m['rest_s_per_step']:.2f} | {m['mean_completion_tokens']:.0f} | {m['clipped_ratio']:.2f} |")
    speedup = mean["trl"]["s_per_step"] / mean["codetune"]["s_per_step"]
    gen = mean["trl"]["generate_s_per_step"] / mean["codetune"]["generate_s_per_step"]
    print(f"codetune's rollouts: {speedup:.2f}x per step, {gen:.2f}x on generation")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "measured": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(), "cpus": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS"),
        "run": str(args.run), "settings": settings, "rows": rows, "mean": mean,
        "speedup_per_step": speedup, "speedup_generation": gen,
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
