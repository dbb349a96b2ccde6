"""Generation speed: one prompt at a time through a text-generation pipeline (as the reference card's
notebook did) against codetune's batched path (left padding, KV cache, waves), same prompts, same model,
greedy decoding.

    python benchmarks/generation_speed.py                       # the tiny model, on this CPU
    python benchmarks/generation_speed.py --source runs/tiny-cpu   # the demo's fine-tuned model
    python benchmarks/generation_speed.py --phi3-mini           # full-size Phi-3-mini, random weights (GPU)

``--adapter-vs-merged`` times, instead, the two models ``codetune eval`` can generate with
(``evaluation.model``): the 4-bit base with the unmerged LoRA adapter, which dequantizes every weight
at every step, against the adapter merged into the unquantized base in the compute dtype (what the
reference notebook evaluated). Same prompts, greedy, batched and one prompt at a time. Without
``--source RUN_DIR`` it makes a run directory with a random adapter (speed does not depend on training):

    python benchmarks/generation_speed.py --adapter-vs-merged                      # tiny model, this CPU
    python benchmarks/generation_speed.py --adapter-vs-merged --phi3-mini          # Phi-3-mini, on a GPU
    python benchmarks/generation_speed.py --adapter-vs-merged --phi3-mini --small  # its CPU dry run

Prints a table and writes JSON (default benchmarks/results/generation_speed.json, or
generation_speed_merged.json with --adapter-vs-merged).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path


def sequential(model, tokenizer, convs, cfg) -> list[str]:
    """The card's notebook: a text-generation pipeline, one chat-templated prompt per call, the text after
    the prompt, stripped. Greedy here, with the recipe's stop tokens, so that outputs can be compared."""
    from transformers import pipeline

    from codetune.model import stop_token_ids

    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    stops = stop_token_ids(tokenizer, cfg.stop_tokens)
    answers = []
    for conv in convs:
        prompt = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        out = pipe(
            prompt,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
            return_full_text=False,
        )
        answers.append(out[0]["generated_text"].strip())
    return answers


SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8)


def random_phi3_folder(small: bool) -> str:
    """Phi-3-mini's architecture (or a small one) with random bf16 weights and the tiny tokenizer, saved."""
    import torch
    from transformers import AutoModelForCausalLM

    from codetune.model import phi3_mini_config
    from codetune.tiny import build_tiny_tokenizer

    folder = tempfile.mkdtemp(prefix="phi3-random-")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(phi3_mini_config(**(SMALL if small else {})), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def random_adapter_run(model_dir: str | None) -> Path:
    """A run directory whose adapter is fresh LoRA with random B (a zero B would merge into nothing)."""
    import torch

    from codetune.model import attach_lora, load_base_model
    from codetune.recipe import load_recipe, save_recipe
    from codetune.rundir import RunDir

    if model_dir is None:
        recipe = load_recipe("tiny-cpu")
    else:  # the seed recipe's LoRA and quantization, on the random model and its byte-level tokenizer
        recipe = load_recipe(
            "phi3-mini-python-seed",
            [
                f"model.name_or_path={model_dir}",
                "model.revision=null",
                "tokenizer.chat_template=phi3",
                "tokenizer.pad_token=<|endoftext|>",
                "tokenizer.encode_with=transformers",
            ],
        )
    run = Path(tempfile.mkdtemp(prefix="adapter-run-"))
    model = attach_lora(load_base_model(recipe, quantize=False), recipe, gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(run / RunDir.ADAPTER)
    save_recipe(recipe, run)
    return run


def _count_new_tokens(model) -> dict:
    """Count the tokens each ``model.generate`` call makes, up to each row's stop token: a random
    model's ids past the small tokenizer's vocabulary decode to nothing, so the text cannot count them."""
    counter = {"new": 0}
    original = model.generate

    def generate(*args, **kwargs):
        out = original(*args, **kwargs)
        stops = set(kwargs.get("eos_token_id") or [])
        for row in out[:, kwargs["input_ids"].shape[1] :].tolist():
            counter["new"] += next((j for j, t in enumerate(row) if t in stops), len(row))
        return out

    model.generate = generate
    return counter


def adapter_vs_merged(args) -> None:
    import torch

    from codetune.generate import generate, load_for_inference
    from codetune.starter import load_starter

    cuda = torch.cuda.is_available()
    if args.source:
        run = Path(args.source)
    else:
        run = random_adapter_run(random_phi3_folder(args.small) if args.phi3_mini else None)
    rows = load_starter()[: args.prompts]
    convs = [[{"role": "user", "content": r["instruction"]}] for r in rows]
    one_at_a_time = convs[: args.one_at_a_time]
    results = []
    outputs = {}
    for kind in ("adapter", "merged"):
        loaded = load_for_inference(run, merged=kind == "merged")
        model, tok = loaded.model, loaded.tokenizer
        counted = _count_new_tokens(model)
        cfg = loaded.recipe.generation.model_copy(update={"do_sample": False, "max_new_tokens": args.max_new_tokens})
        generate(model, tok, convs[:2], cfg, batch_size=2)  # warm-up (allocator, kernels)
        for label, prompts, batch_size in [
            (f"batched ({args.batch_size})", convs, args.batch_size),
            ("one prompt at a time", one_at_a_time, 1),
        ]:
            if cuda:
                torch.cuda.synchronize()
            counted["new"] = 0
            t0 = time.perf_counter()
            answers = generate(model, tok, prompts, cfg, batch_size=batch_size)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            new_tokens = counted["new"]
            outputs[(kind, label)] = answers
            results.append(
                {
                    "model": kind,
                    "path": label,
                    "prompts": len(prompts),
                    "seconds": round(seconds, 3),
                    "new_tokens": new_tokens,
                    "new_tokens_per_s": round(new_tokens / seconds, 1),
                }
            )
        del loaded, model
        if cuda:
            torch.cuda.empty_cache()
    by = {(r["model"], r["path"]): r for r in results}
    for r in results:
        if r["model"] == "merged":
            r["speedup_over_adapter"] = round(by[("adapter", r["path"])]["seconds"] / r["seconds"], 2)
            same = outputs[("adapter", r["path"])], outputs[("merged", r["path"])]
            r["identical_outputs"] = f"{sum(a == b for a, b in zip(*same, strict=True))}/{len(same[0])}"
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name(0)}" if cuda else ", CPU only"),
        "model": str(args.source)
        if args.source
        else ("Phi-3-mini" + (" (small config)" if args.small else "") if args.phi3_mini else "builtin:tiny-phi3")
        + ", random LoRA adapter",
        "max_new_tokens": args.max_new_tokens,
        "results": results,
        "note": "Greedy. adapter = 4-bit NF4 base + unmerged LoRA; merged = LoRA folded into the unquantized base "
        "in the compute dtype. Outputs differ where 4-bit rounding of the base changes an argmax.",
    }
    print(f"{'model':<9}{'path':<24}{'prompts':>8}{'seconds':>10}{'new tok/s':>11}{'speedup':>9}")
    for r in results:
        speed = f"{r['speedup_over_adapter']:.2f}x" if "speedup_over_adapter" in r else ""
        print(
            f"{r['model']:<9}{r['path']:<24}{r['prompts']:>8}{r['seconds']:>10.2f}{r['new_tokens_per_s']:>11.1f}"
            f"{speed:>9}"
        )
    out = Path(args.out or Path(__file__).parent / "results" / "generation_speed_merged.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=None, help="run directory or model folder (default: the tiny base model)")
    ap.add_argument("--prompts", type=int, default=None, help="how many starter-set prompts (default: all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--phi3-mini", action="store_true", help="full-size Phi-3-mini architecture, random weights")
    ap.add_argument("--adapter-vs-merged", action="store_true", help="4-bit base + adapter against the merged model")
    ap.add_argument("--small", action="store_true", help="with --phi3-mini: a small config, for a CPU dry run")
    ap.add_argument("--one-at-a-time", type=int, default=16, help="prompts timed one at a time (--adapter-vs-merged)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.adapter_vs_merged:
        adapter_vs_merged(args)
        return
    args.out = args.out or str(Path(__file__).parent / "results" / "generation_speed.json")

    import torch

    from codetune.generate import generate, load_for_inference
    from codetune.model import phi3_mini_config
    from codetune.starter import load_starter
    from codetune.tiny import build_tiny_tokenizer, ensure_tiny_model

    source = args.source
    if args.phi3_mini:
        from transformers import AutoModelForCausalLM

        source = tempfile.mkdtemp(prefix="phi3-random-")
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(phi3_mini_config(), dtype=torch.bfloat16)
        model.save_pretrained(source)
        build_tiny_tokenizer().save_pretrained(source)
        del model
    loaded = load_for_inference(source or ensure_tiny_model())
    model, tok = loaded.model, loaded.tokenizer
    if torch.cuda.is_available():
        model.to("cuda")
    cfg = loaded.recipe.generation.model_copy(update={"do_sample": False, "max_new_tokens": args.max_new_tokens})
    rows = load_starter()[: args.prompts]
    convs = [[{"role": "user", "content": r["instruction"]}] for r in rows]

    generate(model, tok, convs[:2], cfg, batch_size=2)  # warm-up (allocator, kernels)
    t0 = time.perf_counter()
    one_by_one = sequential(model, tok, convs, cfg)
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = generate(model, tok, convs, cfg, batch_size=args.batch_size)
    t_batch = time.perf_counter() - t0

    same = sum(a == b for a, b in zip(one_by_one, batched, strict=True))
    new_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in batched)
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", CPU only"),
        "model": "Phi-3-mini (random weights)" if args.phi3_mini else str(source or "builtin:tiny-phi3"),
        "prompts": len(convs),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "one_at_a_time_s": round(t_seq, 3),
        "batched_s": round(t_batch, 3),
        "speedup": round(t_seq / t_batch, 2),
        "batched_new_tokens_per_s": round(new_tokens / t_batch, 1),
        "identical_outputs": f"{same}/{len(convs)}",
        "note": "Greedy decoding. A difference, where there is one, comes from left-padded batches computing the "
        "same logits with other matrix shapes: float rounding can flip an argmax between two near-tied tokens.",
    }
    print(f"{'path':<22}{'seconds':>10}{'new tok/s':>12}")
    print(f"{'one prompt at a time':<22}{t_seq:>10.2f}{new_tokens / t_seq:>12.1f}")
    print(f"{'codetune batched':<22}{t_batch:>10.2f}{new_tokens / t_batch:>12.1f}")
    print(f"speedup {report['speedup']}x, identical outputs {report['identical_outputs']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
