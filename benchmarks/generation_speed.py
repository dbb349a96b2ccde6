"""Generation speed: one prompt at a time through a text-generation pipeline (as the reference card's
notebook did) against codetune's batched path (left padding, KV cache, waves), same prompts, same model,
greedy decoding.

    python benchmarks/generation_speed.py                       # the tiny model, on this CPU
    python benchmarks/generation_speed.py --source runs/tiny-cpu   # the demo's fine-tuned model
    python benchmarks/generation_speed.py --phi3-mini           # full-size Phi-3-mini, random weights (GPU)

Prints a table and writes JSON (default benchmarks/results/generation_speed.json).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=None, help="run directory or model folder (default: the tiny base model)")
    ap.add_argument("--prompts", type=int, default=None, help="how many starter-set prompts (default: all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--phi3-mini", action="store_true", help="full-size Phi-3-mini architecture, random weights")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation_speed.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from codetune.generate import generate, load_for_inference
    from codetune.model import build_tiny_tokenizer, ensure_tiny_model, phi3_mini_config
    from codetune.starter import load_starter

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
