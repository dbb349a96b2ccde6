import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from codetune.data import load_split
from codetune.pipeline import train
from codetune.prepare import prepare
from codetune.recipe import RecipeError, load_recipe
from codetune.rundir import RunDir
from codetune.train import NonFiniteLossError

from .test_data import alpaca_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def quiet(*_):
    pass


def tiny_recipe(*overrides):
    return load_recipe("tiny-cpu", list(overrides))


def codetune_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "codetune.cli", *args]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------------------
# bitsandbytes on AVX512-BF16 CPUs


def _lora_grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_gradients_after_an_evaluation_equal_a_fresh_models(tiny_dir):
    from codetune.model import attach_lora, load_base_model

    recipe = tiny_recipe()
    batch_ids = torch.randint(10, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": batch_ids, "labels": batch_ids}

    def fresh():
        model = attach_lora(load_base_model(recipe), recipe, gradient_checkpointing=False)
        with torch.no_grad():  # give LoRA's B a non-zero value so every gradient is non-trivial
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        return model

    reference = _lora_grads(fresh().train(), batch)
    model = fresh()
    model.eval()
    with torch.no_grad():
        model(**batch)  # the eval-mode forward that flips bitsandbytes onto its AVX512-BF16 path
    after_eval = _lora_grads(model.train(), batch)
    assert reference.keys() == after_eval.keys() and len(reference) > 0
    for name, grad in reference.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(after_eval[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_every_4bit_layer_has_the_avx512_path_switched_off(tiny_dir):
    from codetune.model import load_base_model

    model = load_base_model(tiny_recipe())
    flags = [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(flags) == 2 * 4 and not any(flags)  # 2 layers x (qkv, o, gate_up, down)


# ---------------------------------------------------------------------------------------
# Packing


def test_packed_logits_equal_each_example_run_alone(tmp_path, tiny_dir):
    from trl import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    recipe = tiny_recipe()
    prepare(recipe, tmp_path / "run", log=quiet)
    rows = load_split(tmp_path / "run", "train").select(range(12)).select_columns(["input_ids", "labels"])
    packed = pack_dataset(rows, 512, strategy="bfd")
    assert len(packed) < len(rows)  # several examples share a row
    from codetune.model import attach_lora, load_base_model

    # the model exactly as training sees it: 4-bit base, LoRA attached (with non-zero B), train mode
    model = attach_lora(load_base_model(recipe), recipe, gradient_checkpointing=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    by_ids = {tuple(r["input_ids"]): r["input_ids"] for r in rows}
    checked = 0
    for row in packed:
        batch = collator([row])
        assert "attention_mask" not in batch
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        start = 0
        for length in row["seq_lengths"]:
            ids = row["input_ids"][start : start + length]
            assert tuple(ids) in by_ids
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(logits[start : start + length], alone, rtol=1e-4, atol=1e-4)
            # and the first token of each example carries no loss: nothing predicts across examples
            assert batch["labels"][0, start] == -100
            start += length
            checked += 1
    assert checked == len(rows)


# ---------------------------------------------------------------------------------------
# The stage


def test_train_writes_the_run_directory(tmp_path, tiny_dir):
    run = tmp_path / "run"
    recipe = tiny_recipe(
        "training.max_steps=12", "training.save_steps=5", "training.eval_steps=5", "training.logging_steps=2"
    )
    res = train(recipe, run)
    assert res.global_step == 12
    for name in [
        "recipe.yaml",
        "data/train.parquet",
        "data/stats.json",
        "metrics.jsonl",
        "loss_table.md",
        "loss.png",
        "train_summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
        "adapter/tokenizer_config.json",
    ]:
        assert (run / name).is_file(), name
    assert [p.name for p in RunDir(run).complete_checkpoints()] == ["checkpoint-10", "checkpoint-12"]  # save_total_limit 2
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    keys = {"step", "epoch", "train_loss", "eval_loss", "learning_rate", "tokens", "tokens_per_s", "elapsed_s"}
    assert all(keys <= m.keys() for m in metrics)
    train_rows = [m for m in metrics if m["train_loss"] is not None]
    assert [m["step"] for m in train_rows] == [1, 2, 4, 6, 8, 10, 12]
    assert [m["step"] for m in metrics if m["eval_loss"] is not None] == [5, 10, 12]
    assert all(m["tokens"] > 0 and m["tokens_per_s"] > 0 for m in train_rows)
    assert train_rows[-1]["elapsed_s"] >= train_rows[0]["elapsed_s"]
    table = (run / "loss_table.md").read_text().splitlines()
    assert table[0] == "| Step | Training Loss | Validation Loss |" and len(table) == 2 + 3
    adapter_cfg = json.loads((run / "adapter/adapter_config.json").read_text())
    assert set(adapter_cfg["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_lowers_the_loss_on_the_starter_set(tmp_path, tiny_dir):
    # 8 of the demo's 60 epochs: enough to see both losses fall (tests/test_demo.py trains all 60)
    res = train(tiny_recipe("training.epochs=8", "training.eval_steps=40"), tmp_path / "run")
    metrics = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    losses = [m["train_loss"] for m in metrics if m["train_loss"] is not None]
    assert losses[-1] < 0.75 * losses[0]
    evals = [m["eval_loss"] for m in metrics if m["eval_loss"] is not None]
    assert evals[-1] < evals[0]
    assert res.summary["trainable_parameters"] == 2 * 64 * ((128 + 384) + (128 + 128) + (128 + 512) + (256 + 128))


def test_existing_run_needs_resume_or_overwrite(tmp_path, tiny_dir):
    run = tmp_path / "run"
    train(tiny_recipe("training.max_steps=2", "training.eval_steps=null"), run)
    with pytest.raises(RecipeError, match="already holds a training run .* --resume .* --overwrite"):
        train(tiny_recipe("training.max_steps=2"), run)
    assert (run / "adapter/adapter_model.safetensors").is_file()  # nothing was lost
    res = train(tiny_recipe("training.max_steps=3", "training.eval_steps=null"), run, overwrite=True)
    assert res.global_step == 3


def test_bad_setup_fails_before_the_model_loads(tmp_path, tiny_dir, monkeypatch):
    import codetune.model as model_mod
    import codetune.train as train_mod

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model_mod, "load_base_model", no_load)
    monkeypatch.setattr(train_mod, "load_base_model", no_load)
    with pytest.raises(RecipeError, match="model.name_or_path: local path .*nowhere' does not exist"):
        train(
            tiny_recipe(f"model.name_or_path={tmp_path}/nowhere", f"tokenizer.name_or_path={tiny_dir}"), tmp_path / "a"
        )
    with pytest.raises(
        RecipeError,
        match=r"lora.target_modules: q_proj, v_proj match no linear layer of phi3, which has "
        r"down_proj, gate_up_proj, lm_head, o_proj, qkv_proj; use `family`",
    ):
        train(tiny_recipe("lora.target_modules=[q_proj, v_proj]"), tmp_path / "b")
    with pytest.raises(RecipeError, match="training.precision fp16 needs a CUDA GPU: use --set training.precision"):
        train(tiny_recipe("training.precision=fp16"), tmp_path / "c")
    with pytest.raises(RecipeError, match="flash_attention_2 needs a CUDA GPU"):
        train(tiny_recipe("model.attn_implementation=flash_attention_2"), tmp_path / "d")
    src = write_jsonl(tmp_path / "long.jsonl", [dict(r, output="x = 1\n" * 300) for r in alpaca_rows(20)])
    with pytest.raises(Exception, match="training split is empty"):
        train(tiny_recipe(f"data.source={src}", "data.too_long=drop"), tmp_path / "e")


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_dir, monkeypatch):
    from transformers import Trainer

    original = Trainer.compute_loss

    def poisoned(self, model, inputs, *a, **k):
        loss = original(self, model, inputs, *a, **k)
        return loss * float("nan") if self.state.global_step >= 6 else loss

    monkeypatch.setattr(Trainer, "compute_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_recipe("training.max_steps=20", "training.save_steps=5", "training.eval_steps=null"), run)
    assert info.value.step == 7
    assert "at step 7" in str(info.value) and "checkpoint-5" in str(info.value)
    assert [p.name for p in RunDir(run).complete_checkpoints()] == ["checkpoint-5"]
    assert not (run / "adapter").exists()


# ---------------------------------------------------------------------------------------
# The whole path: learn 8 rows, then answer them


def test_learns_eight_rows_and_answers_them_stopping_at_end(tmp_path, tiny_dir):
    from rouge_score import rouge_scorer

    from codetune.generate import generate, load_for_inference
    from codetune.starter import load_starter

    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in load_starter()[:9]]
    src = write_jsonl(tmp_path / "eight.jsonl", rows)
    recipe = tiny_recipe(
        f"data.source={src}",
        "data.split.test_size=1",
        "data.decontaminate=[]",
        "training.max_steps=150",
        "training.learning_rate=5e-3",
        "training.warmup_ratio=0.0",
        "training.eval_steps=null",
        "training.save_strategy=no",
        "lora.r=32",
        "lora.alpha=64",
        "training.batch_size=8",
        "data.packing=false",
    )
    run = tmp_path / "run"
    train(recipe, run)
    train_rows = load_split(run, "train")
    assert len(train_rows) == 8
    loaded = load_for_inference(run)
    gen = loaded.recipe.generation.model_copy(update={"do_sample": False, "max_new_tokens": 200})
    answers = generate(loaded.model, loaded.tokenizer, [r["prompt"] for r in train_rows], gen)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r["reference"], a)["rougeL"].fmeasure for r, a in zip(train_rows, answers, strict=True)]
    assert min(scores) >= 0.9, list(zip(scores, answers, strict=True))
    # it stopped on <|end|>: the raw continuation ends there, well before max_new_tokens
    tok = loaded.tokenizer
    end_id = tok.convert_tokens_to_ids("<|end|>")
    text = tok.apply_chat_template(train_rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = loaded.model.generate(
            **enc, max_new_tokens=200, do_sample=False, eos_token_id=[end_id], pad_token_id=tok.pad_token_id
        )
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    assert new[-1] == end_id and len(new) < 200


# ---------------------------------------------------------------------------------------
# Reliability across processes


def test_resume_after_sigkill_finishes_with_the_same_steps(tmp_path, tiny_dir):
    args = [
        "--set",
        "training.max_steps=40",
        "--set",
        "training.save_steps=10",
        "--set",
        "training.eval_steps=null",
        "--set",
        "training.save_total_limit=null",
        "--set",
        "training.logging_steps=1",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(
        codetune_cmd("train", "tiny-cpu", "-o", str(whole), *args),
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(
        codetune_cmd("train", "tiny-cpu", "-o", str(killed), *args),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints/checkpoint-20/trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()
    last = RunDir(killed).complete_checkpoints()[-1]
    assert 20 <= int(last.name.split("-")[1]) < 40

    resumed = subprocess.run(
        codetune_cmd("train", "tiny-cpu", "-o", str(killed), "--resume", *args),
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {last}" in resumed.stderr.replace("\n", "")
    a = json.loads((whole / "train_summary.json").read_text())
    b = json.loads((killed / "train_summary.json").read_text())
    assert a["global_step"] == b["global_step"] == 40 and a["tokens"] == b["tokens"]
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(x)["step"] for x in (whole / "metrics.jsonl").read_text().splitlines()]
    # same optimizer, scheduler and data position: the resumed run ends where the whole one did
    from safetensors.torch import load_file

    wa = load_file(whole / "adapter/adapter_model.safetensors")
    wb = load_file(killed / "adapter/adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_two_process_ddp_with_accelerate_launch(tmp_path, tiny_dir):
    run = tmp_path / "ddp"
    # --multi_gpu picks accelerate's torchrun launcher; without CUDA it runs DDP over gloo on the CPU.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "codetune.cli",
        "train",
        "tiny-cpu",
        "-o",
        str(run),
        "--set",
        "training.max_steps=6",
        "--set",
        "training.eval_steps=3",
        "--set",
        "training.save_steps=3",
    ]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "rank 0/2 finished at step 6" in log and "rank 1/2 finished at step 6" in log
    # one process prepares the data and reports progress; the other waits for it (not both at once)
    assert log.count("preparing data") == 1 and log.count("read 624 rows") == 1, log[-3000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 6
    assert sorted(p.name for p in (run / "adapter").iterdir() if p.name.startswith("adapter_")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not list(run.glob(".adapter*"))


def test_sharded_qlora_needs_quant_storage_in_the_compute_dtype(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(
        RecipeError,
        match="quantization.quant_storage is uint8, but fsdp shards .* --set quantization.quant_storage=float32",
    ):
        train(tiny_recipe(), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before any work


def test_shipped_accelerate_configs(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from codetune.cli import app

    runner = CliRunner()
    kinds = {"ddp": "MULTI_GPU", "fsdp_qlora": "FSDP", "deepspeed_zero3": "DEEPSPEED"}
    for name, kind in kinds.items():
        res = runner.invoke(app, ["accelerate-config", name])
        assert res.exit_code == 0, res.output
        config = yaml.safe_load(Path(res.stdout.strip()).read_text())
        assert config["distributed_type"] == kind
    fsdp = yaml.safe_load(Path(runner.invoke(app, ["accelerate-config", "fsdp_qlora"]).stdout.strip()).read_text())
    assert fsdp["fsdp_config"]["fsdp_use_orig_params"] is False
    assert fsdp["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True
    assert runner.invoke(app, ["accelerate-config", "nope"]).exit_code == 2


def test_cli_train_prints_plain_progress_when_not_a_terminal(tmp_path, tiny_dir):
    res = subprocess.run(
        codetune_cmd(
            "run",
            "tiny-cpu",
            "-o",
            str(tmp_path / "run"),
            "--set",
            "training.max_steps=4",
            "--set",
            "training.logging_steps=2",
            "--set",
            "training.eval_steps=4",
        ),
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [x for x in res.stderr.splitlines() if x.startswith("step ")]
    assert lines[0].startswith("step 1/4 | loss ") and "tok/s" in lines[0] and "eta" in lines[0]
    assert any(x.startswith("step 4/4 | eval_loss ") for x in lines)
    assert "\x1b[" not in res.stderr  # no terminal control codes in a log
    assert "adapter  ->" in res.stdout and "run      ->" in res.stdout
    again = subprocess.run(
        codetune_cmd("run", "tiny-cpu", "-o", str(tmp_path / "run")),
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 2 and "already holds a training run" in again.stderr


def test_lora_init_from_starts_from_that_adapter_and_refuses_another_shape_before_any_work(tiny_run, tmp_path):
    """`lora.init_from`: more training of an adapter (benchmarks/rl_gain.py's SFT control continues the SFT one)."""
    from safetensors.torch import load_file

    start = load_file(tiny_run / "adapter" / "adapter_model.safetensors")
    settings = ["training.max_steps=1", "training.learning_rate=1e-12", "training.eval_steps=null", "training.save_strategy=no"]
    train(load_recipe("tiny-cpu", [*settings, f"lora.init_from={tiny_run / 'adapter'}"]), tmp_path / "more")
    more = load_file(tmp_path / "more" / "adapter" / "adapter_model.safetensors")
    assert more.keys() == start.keys()
    for k in start:
        torch.testing.assert_close(more[k], start[k], rtol=0, atol=1e-6, msg=k)
    train(load_recipe("tiny-cpu", settings), tmp_path / "fresh")  # without it: fresh LoRA weights
    fresh = load_file(tmp_path / "fresh" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.allclose(fresh[k], start[k]) for k in start)
    with pytest.raises(RecipeError, match=r"lora.init_from: .* has LoRA rank 64, the recipe's lora.r is 8"):
        train(load_recipe("tiny-cpu", [*settings, "lora.r=8", f"lora.init_from={tiny_run / 'adapter'}"]), tmp_path / "r8")
    with pytest.raises(RecipeError, match=r"lora.init_from: .*nowhere is not a readable LoRA adapter folder"):
        train(load_recipe("tiny-cpu", [*settings, f"lora.init_from={tmp_path / 'nowhere'}"]), tmp_path / "none")
    assert not (tmp_path / "r8").exists() and not (tmp_path / "none").exists()  # refused before anything was written
