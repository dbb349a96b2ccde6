"""Train 30 steps of the improved recipe on the full-size Phi-3-mini architecture (random weights).

Prepared for a lent GPU (issue 3): no hub access is needed. The script builds Phi-3-mini from its
configuration alone (hidden 3072, 32 layers, MLP 8192, vocabulary 32064) with random bf16 weights,
saves it locally, and runs `codetune.train.train` with the `phi3-mini-python` recipe: 4-bit NF4
with double quantization, LoRA on qkv/o/gate_up/down, packing, per-device batch 4 x accumulation 8
at max length 512 (the reference batch shape), on synthetic code-like rows whose lengths follow
the reference data's. It prints tokens/s and peak GPU memory and writes them as JSON.

    python benchmarks/gpu_train_phi3.py --out results.json             # on a CUDA GPU, < 8 minutes
    python benchmarks/gpu_train_phi3.py --small --steps 3 --out x.json # a CPU dry run of the same path
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from datetime import date
from pathlib import Path


def synthetic_rows(n: int, vocab: int, seed: int) -> list[dict]:
    """Code-like rows: lengths log-normal around the reference data's (median ~140, p95 ~400 tokens),
    the first third a prompt (masked), the rest the answer (trained)."""
    import math

    from codetune.data import IGNORE_INDEX

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = int(min(512, max(24, math.exp(rng.gauss(math.log(140), 0.6)))))
        ids = [rng.randrange(100, vocab - 100) for _ in range(length)]
        cut = length // 3
        labels = [IGNORE_INDEX] * cut + ids[cut:]
        messages = [{"role": "user", "content": f"task {i}"}, {"role": "assistant", "content": "pass"}]
        rows.append(
            {
                "row": i + 1,
                "prompt": messages[:1],
                "reference": "pass",
                "messages": messages,
                "text": "",
                "input_ids": ids,
                "labels": labels,
                "n_tokens": length,
                "truncated": False,
                "meta": "{}",
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--small", action="store_true", help="hidden 256, 2 layers: a CPU dry run of the same path")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="gpu_train_phi3.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    from codetune.model import build_tiny_tokenizer, phi3_mini_config
    from codetune.recipe import load_recipe, save_recipe
    from codetune.train import train

    cuda = torch.cuda.is_available()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="phi3-bench-"))
    model_dir, run_dir = work / "phi3-mini-random", work / "run"
    overrides = (
        dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8)
        if args.small
        else {}
    )
    config = phi3_mini_config(**overrides)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)  # ids only matter for padding: rows are synthetic
    del model
    if cuda:
        torch.cuda.empty_cache()
    build_s = time.perf_counter() - t0

    settings = [
        f"model.name_or_path={model_dir}",
        "tokenizer.model_max_length=4096",
        f"training.max_steps={args.steps}",
        "training.eval_steps=null",
        "training.save_strategy=no",
        "training.logging_steps=5",
        "training.batch_size=4",
        "training.gradient_accumulation_steps=8",
        "training.report_to=[]",
    ]
    if not cuda:
        settings += ["training.precision=fp32", "quantization.compute_dtype=float32", "training.optimizer=adamw_torch"]
    recipe = load_recipe("phi3-mini-python", settings)
    rows = synthetic_rows(args.rows, config.vocab_size, seed=0)
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(run_dir / "data/train.parquet"))
    datasets.Dataset.from_list(rows[:64]).to_parquet(str(run_dir / "data/test.parquet"))
    (run_dir / "data/stats.json").write_text("{}\n")
    save_recipe(recipe, run_dir)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = train(recipe, run_dir)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # steady state: skip the first logged step (kernel warm-up, quantization on first use)
    logged = [m for m in metrics if m["train_loss"] is not None]
    steady = None
    if len(logged) >= 3:
        first, last = logged[1], logged[-1]
        steady = round((last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"]), 1)
    report = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "architecture": "Phi-3-mini (small dry run)" if args.small else "Phi-3-mini-4k (3.8B, random weights)",
        "recipe": recipe.name,
        "steps": result.global_step,
        "batch": "4 x 8 accumulation, packed rows of 512",
        "tokens": result.summary["tokens"],
        "tokens_per_s_steady": steady,
        "tokens_per_s_overall": round(result.summary["tokens"] / result.summary["wall_s_this_session"], 1),
        "train_wall_s": result.summary["wall_s_this_session"],
        "build_s": round(build_s, 1),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "trainable_parameters": result.summary["trainable_parameters"],
        "last_train_loss": result.train_loss,
    }
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
