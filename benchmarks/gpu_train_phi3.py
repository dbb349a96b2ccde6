"""The training benchmark on a GPU: full-size Phi-3-mini (random weights, 4-bit NF4), both paths, one call.

Prepared for a lent GPU (issue 6); no hub access and no ../shared needed. The script

1. measures the card's bf16 peak: a large bf16 matmul, in TFLOP/s;
2. builds Phi-3-mini from its configuration alone (hidden 3072, 32 layers, MLP 8192, vocabulary
   32,064) with random bf16 weights and saves it locally;
3. trains ``--steps`` optimizer steps of each path, each in its own process, on the same synthetic
   rows with MBPP-like lengths (median ~95 tokens, the first quarter a prompt):
     reference  TRL's SFTTrainer as the card's run: padded batches of 4 x 8, no packing, loss on all
                tokens, TRL's default loss path, bf16, LoRA on the card's (effective) modules;
     codetune   ``codetune.train.train`` with the phi3-mini-python recipe (packing, lean loss,
                answer-only loss, LoRA on all four linear kinds);
4. prints and writes: non-padding tokens/s (steady state, from the second step on), seconds per
   optimizer step, peak GPU memory, model FLOPs utilisation against the measured peak, and the
   estimated wall time of the full reference recipe (1,656 optimizer steps = 17,681 rows x 3
   epochs / 32 rows per step) at the measured seconds per step.

Model FLOPs per trained token are counted as 4 x the matmul parameters (forward, plus the backward
pass's activation gradients; the 4-bit base gets no weight gradients, and checkpointing's recompute
is not model work); attention scores add under 3% at these lengths and are left out.

    python benchmarks/gpu_train_phi3.py                          # on a CUDA GPU, < 8 minutes
    python benchmarks/gpu_train_phi3.py --small --steps 3        # a CPU dry run of the same code
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REFERENCE_STEPS = 1656  # 17,681 rows x 3 epochs / (4 x 8) rows per optimizer step, as the notebook logged
SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8)


def measure_bf16_peak(cuda: bool) -> float:
    """TFLOP/s of a large bf16 matmul: the card's measured peak for this kind of work."""
    import torch

    n, reps = (8192, 50) if cuda else (1024, 5)
    device = "cuda" if cuda else "cpu"
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def matmul_parameters(config) -> int:
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * (d + 2 * kv) + d * d + d * 2 * f + f * d  # qkv, o, gate_up, down
    return layers * per_layer + config.vocab_size * d  # + lm_head


def synthetic_rows(n: int, vocab: int, seed: int, *, all_tokens: bool) -> list[dict]:
    """Rows with MBPP-like lengths (log-normal, median ~95 tokens, 24..512), the first quarter a prompt."""
    from codetune.data import IGNORE_INDEX

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = int(min(512, max(24, math.exp(rng.gauss(math.log(95), 0.45)))))
        ids = [rng.randrange(100, vocab - 100) for _ in range(length)]
        cut = length // 4
        labels = list(ids) if all_tokens else [IGNORE_INDEX] * cut + ids[cut:]
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


def settings(path: str, model_dir: Path, steps: int, cuda: bool) -> list[str]:
    out = [
        f"model.name_or_path={model_dir}",
        "tokenizer.chat_template=phi3",
        "tokenizer.pad_token=<|endoftext|>",
        f"training.max_steps={steps}",
        "training.eval_steps=null",
        "training.save_strategy=no",
        "training.logging_steps=1",
        "training.report_to=[]",
        "training.batch_size=4",
        "training.gradient_accumulation_steps=8",  # both paths at the reference's batch shape
    ]
    if path == "codetune":
        out.append("data.decontaminate=[]")
    if not cuda:
        out += ["training.optimizer=adamw_torch"]
    return out


def child(spec: dict) -> None:
    import torch
    from train_speed import PATHS, StepClock, _count_collated_batches, run_codetune, run_reference

    from codetune.recipe import load_recipe

    cuda = torch.cuda.is_available()
    run_dir = Path(spec["run_dir"])
    recipe = load_recipe(run_dir / "recipe.yaml")
    stats = {"positions": 0, "real_tokens": 0, "batches": 0}
    _count_collated_batches(stats)
    clock = StepClock(stats)
    if spec["path"] == "reference":
        out = run_reference(recipe, run_dir, bf16=cuda, callbacks=[clock])
    else:
        out = run_codetune(recipe, run_dir, callbacks=[clock])
    out.update(stats)
    out["steady_tokens_per_s"], out["steady_s_per_step"] = clock.steady()
    out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    out["recipe"] = PATHS[spec["path"]]
    Path(spec["result"]).write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", type=int, default=1200, help="synthetic rows (the reference uses 32 per step)")
    ap.add_argument("--small", action="store_true", help="hidden 256, 2 layers: a CPU dry run of the same code")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="gpu_train_phi3.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import datasets
    import torch
    from train_speed import PATHS, fmt_table, machine
    from transformers import AutoModelForCausalLM

    from codetune.model import phi3_mini_config
    from codetune.recipe import load_recipe, save_recipe
    from codetune.tiny import build_tiny_tokenizer

    cuda = torch.cuda.is_available()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="phi3-gpu-bench-"))
    model_dir = work / "phi3-mini-random"
    config = phi3_mini_config(**(SMALL if args.small else {}))
    peak = measure_bf16_peak(cuda)
    print(f"bf16 matmul peak: {peak:,.1f} TFLOP/s", flush=True)

    t0 = time.perf_counter()
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda" if cuda else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(model_dir)
        build_tiny_tokenizer().save_pretrained(model_dir)  # ids only matter for padding: rows are synthetic
        del model
        if cuda:
            torch.cuda.empty_cache()
    print(f"model built in {time.perf_counter() - t0:.0f} s", flush=True)

    results = []
    for path in ("reference", "codetune"):
        run_dir = work / f"run-{path}"
        recipe = load_recipe(PATHS[path], settings(path, model_dir, args.steps, cuda))
        rows = synthetic_rows(args.rows, config.vocab_size, seed=0, all_tokens=path == "reference")
        (run_dir / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(run_dir / "data/train.parquet"))
        datasets.Dataset.from_list(rows[:32]).to_parquet(str(run_dir / "data/test.parquet"))
        (run_dir / "data/stats.json").write_text("{}\n")
        save_recipe(recipe, run_dir)
        result = run_dir / "result.json"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            json.dumps({"path": path, "run_dir": str(run_dir), "result": str(result)}),
        ]
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"{path} failed with exit {proc.returncode}")
        r = json.loads(result.read_text())
        r["path"] = path
        r["mfu_pct"] = 100 * r["steady_tokens_per_s"] * 4 * matmul_parameters(config) / (peak * 1e12)
        r["reference_recipe_hours"] = REFERENCE_STEPS * r["steady_s_per_step"] / 3600 if path == "reference" else None
        r["padding_pct"] = 100 * (1 - r["real_tokens"] / r["positions"])
        print(
            f"  {path:9s}: {r['steady_tokens_per_s']:,.0f} non-padding tokens/s, "
            f"{r['steady_s_per_step']:.2f} s/step, MFU {r['mfu_pct']:.1f}%",
            flush=True,
        )
        results.append(r)

    columns = [
        ("path", "path", "s"),
        ("precision", "precision", "s"),
        ("padding_pct", "padding %", ".1f"),
        ("steady_tokens_per_s", "non-padding tokens/s", ",.0f"),
        ("steady_s_per_step", "s / step", ".2f"),
        ("peak_gpu_gib", "peak GPU GiB", ".1f"),
        ("mfu_pct", "MFU %", ".1f"),
    ]
    print()
    print(fmt_table(results, columns))
    ref, ct = results
    report = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if cuda else machine(),
        "architecture": "Phi-3-mini (small dry run)" if args.small else "Phi-3-mini-4k (3.8B), random weights",
        "bf16_peak_tflops": peak,
        "matmul_parameters": matmul_parameters(config),
        "steps": args.steps,
        "batch": "4 x 8 accumulation per optimizer step, max length 512",
        "results": results,
        "speedup": ct["steady_tokens_per_s"] / ref["steady_tokens_per_s"],
        "reference_recipe_estimate_hours": ref["reference_recipe_hours"],
        "command": " ".join(["python", "benchmarks/gpu_train_phi3.py"] + sys.argv[1:]),
    }
    print(
        f"\ncodetune / reference: {report['speedup']:.2f}x non-padding tokens/s; the full reference recipe "
        f"({REFERENCE_STEPS} steps) would take about {ref['reference_recipe_hours']:.1f} h on this device"
    )
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
