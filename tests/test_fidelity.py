"""The seed recipe as the reference run (issue 12): token ids, truncation, clipping, loss scaling, step
count, evaluation model, padding side and the split. docs/reproduction.md lists which test pins which fact."""

import json
import math
from pathlib import Path

import pytest
import torch

from codetune.data import IGNORE_INDEX, load_split
from codetune.model import load_tokenizer
from codetune.pipeline import train
from codetune.prepare import prepare, render, tokenize_example
from codetune.recipe import RecipeError, load_recipe
from codetune.train import (
    EpochsBatchSampler,
    PaddedRowsCollator,
    _trainer_class,
    _training_arguments,
    across_epochs_saves,
    across_epochs_steps,
)

from .conftest import PHI3_TOKENIZER_2024_05, needs_phi3_tokenizer
from .test_data import alpaca_rows, write_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "seed_token_ids.json"
REFERENCE_TRAIN_ROWS = 17_681  # train_test_split(test_size=0.05, seed=1234) of the 18,612 rows


def quiet(*_):
    pass


def seed_recipe(*overrides):
    return load_recipe("phi3-mini-python-seed", [f"tokenizer.name_or_path={PHI3_TOKENIZER_2024_05}", *overrides])


def fixture_rows():
    return json.loads(FIXTURE.read_text())["rows"]


# ---------------------------------------------------------------------------------------
# 1, 2: token ids and truncation, against transformers 4.40.2's own output


def test_fixture_says_how_it_was_made():
    made = json.loads(FIXTURE.read_text())["made_with"]
    assert made["transformers"] == "4.40.2" and (Path(__file__).parents[1] / made["script"]).is_file()


@needs_phi3_tokenizer
def test_seed_training_ids_are_transformers_4_40s():
    recipe = seed_recipe()
    tok = load_tokenizer(recipe)
    for row in fixture_rows():
        text = render(tok, row["messages"])
        assert text == row["text"], row["name"]
        got = tokenize_example(tok, recipe, row["messages"], text)
        assert got.input_ids == row["input_ids"], row["name"]
        assert got.labels == row["input_ids"]  # loss on every token, as the reference
        assert got.full_length == row["untruncated_length"]
        assert got.truncated == (row["untruncated_length"] > 512)
    assert fixture_rows()[0]["input_ids"][:5] == [1, 1, 32010, 29871, 13]  # the first training row


@needs_phi3_tokenizer
def test_over_long_row_keeps_its_eos_as_the_512th_token():
    recipe = seed_recipe()
    tok = load_tokenizer(recipe)
    row = next(r for r in fixture_rows() if r["untruncated_length"] > 512)
    got = tokenize_example(tok, recipe, row["messages"], row["text"])
    assert len(got.input_ids) == 512 and got.input_ids[-1] == 32000 and got.labels[-1] == 32000
    assert got.input_ids == row["input_ids"]


@needs_phi3_tokenizer
def test_seed_evaluation_prompt_ids_are_the_pipelines():
    from codetune.generate import _prompt_ids

    tok = load_tokenizer(seed_recipe())
    for row in fixture_rows():
        assert _prompt_ids(tok, [row["messages"][:1]]) == [row["prompt_ids"]], row["name"]


@needs_phi3_tokenizer
def test_transformers_5_own_class_gives_other_ids():
    """Why the seed recipe needs tokenizer.encode_with: 4 tokens fewer per training row, 3 per prompt."""
    from codetune.model import ReferenceTokenizerWarning

    recipe = seed_recipe("tokenizer.encode_with=transformers", "tokenizer.reference_mismatch=warn")
    with pytest.warns(ReferenceTokenizerWarning):  # the seed's tokenizer check sees the difference too
        tok = load_tokenizer(recipe)
    row = fixture_rows()[0]
    got = tokenize_example(tok, recipe, row["messages"], row["text"])
    assert got.input_ids[:4] == [1, 1, 32010, 13]
    assert len(row["input_ids"]) - len(got.input_ids) == 4
    prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
    assert len(row["prompt_ids"]) - len(prompt) == 3


@needs_phi3_tokenizer
def test_prepare_writes_the_reference_ids(tmp_path):
    rows = fixture_rows()
    source = write_jsonl(tmp_path / "rows.jsonl", [{k: r[k] for k in ("instruction", "input", "output")} for r in rows])
    prepare(seed_recipe(f"data.source={source}"), tmp_path / "run", log=quiet)
    prepared = {}
    for split in ("train", "test"):
        for r in load_split(tmp_path / "run", split):
            prepared[r["row"]] = r["input_ids"]
    assert prepared == {i + 1: r["input_ids"] for i, r in enumerate(rows)}


def test_truncation_keeps_added_special_tokens(tiny_dir):
    recipe = load_recipe(
        "tiny-cpu", ["tokenizer.add_bos_token=true", "tokenizer.add_eos_token=true", "data.max_length=16"]
    )
    tok = load_tokenizer(recipe)
    messages = [{"role": "user", "content": "Write " * 20}, {"role": "assistant", "content": "pass " * 20}]
    got = tokenize_example(tok, recipe, messages, render(tok, messages))
    assert got.truncated and got.full_length > 16 and len(got.input_ids) == 16
    assert got.input_ids[0] == tok.bos_token_id and got.input_ids[-1] == tok.eos_token_id
    assert got.labels[-1] == tok.eos_token_id
    whole = tok(render(tok, messages), add_special_tokens=False)["input_ids"]
    assert got.input_ids[1:-1] == whole[:14] and got.full_length == len(whole) + 2


# ---------------------------------------------------------------------------------------
# 3: clipping


def test_seed_clips_at_the_trainer_default(tmp_path):
    recipe = load_recipe("phi3-mini-python-seed")
    assert recipe.training.max_grad_norm == 1.0
    assert _training_arguments(recipe, tmp_path, cuda=False).max_grad_norm == 1.0


# ---------------------------------------------------------------------------------------
# 4: loss normalization through the Trainer's own training_step, against a hand computation


def _tiny_lora_model(recipe):
    from codetune.loss import add_lean_loss
    from codetune.model import attach_lora, load_base_model

    model = load_base_model(recipe, quantize=False)
    assert add_lean_loss(model)
    model = attach_lora(model, recipe, gradient_checkpointing=False)
    with torch.no_grad():  # a non-zero B, so every LoRA gradient is non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return model


def _micro_batches(collator):
    gen = torch.Generator().manual_seed(0)

    def ex(n, trained):
        ids = torch.randint(10, 500, (n,), generator=gen).tolist()
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * (n - trained) + ids[n - trained :]}

    # micro-batch 1: 2 rows and 40 trained tokens; micro-batch 2: 1 row and 4: the two normalizations differ
    return [collator([ex(30, 25), ex(20, 15)]), collator([ex(12, 4)])]


def _hand_loss(model, batches, normalization):
    sums, counts = [], []
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        targets = b["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        sums.append(ce)
        counts.append(int((targets != IGNORE_INDEX).sum()))
    if normalization == "tokens":
        return sum(sums) / sum(counts)
    return sum(s / c for s, c in zip(sums, counts, strict=True)) / len(batches)


@pytest.mark.parametrize("normalization", ["tokens", "micro_batch"])
def test_loss_normalization_matches_a_hand_computation(tmp_path, tiny_dir, normalization):
    recipe = load_recipe(
        "tiny-cpu",
        [
            f"training.loss_normalization={normalization}",
            "training.gradient_accumulation_steps=2",
            "lora.dropout=0.0",
            "data.packing=false",
            "training.eval_steps=null",
        ],
    )
    model = _tiny_lora_model(recipe)
    batches = _micro_batches(PaddedRowsCollator(0, "right"))
    args = _training_arguments(recipe, tmp_path, cuda=False)
    trainer = _trainer_class()(model=model, args=args, train_dataset=[{"input_ids": [1], "labels": [1]}])
    trainer.loss_normalization = normalization
    _, num_items = trainer.get_batch_samples(iter(batches), 2, args.device)
    trainer.current_gradient_accumulation_steps = 2
    model.zero_grad(set_to_none=True)
    reported = sum(float(trainer.training_step(model, dict(b), num_items)) for b in batches)
    via_trainer = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad(set_to_none=True)
    model.train()
    loss = _hand_loss(model, batches, normalization)
    loss.backward()
    assert reported == pytest.approx(float(loss), rel=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(via_trainer[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    with torch.no_grad():
        other = _hand_loss(model, batches, "micro_batch" if normalization == "tokens" else "tokens")
    assert abs(float(other) - float(loss)) > 0.01 * float(loss)  # the two settings really differ here


# ---------------------------------------------------------------------------------------
# 5: step count


def test_seed_makes_the_cards_1656_steps():
    recipe = load_recipe("phi3-mini-python-seed")
    assert recipe.training.accumulation_windows == "across_epochs"
    assert across_epochs_steps(recipe, REFERENCE_TRAIN_ROWS) == (1656, 3)
    # what transformers 5.24 makes of the same epochs: a short window closes each epoch
    micro_batches = math.ceil(REFERENCE_TRAIN_ROWS / 4)
    assert micro_batches == 4421 and 3 * math.ceil(micro_batches / 8) == 1659


def test_seed_schedule_evaluation_and_saving_follow_the_reference(tmp_path):
    recipe = load_recipe("phi3-mini-python-seed")
    steps, epochs = across_epochs_steps(recipe, REFERENCE_TRAIN_ROWS)
    args = _training_arguments(recipe, tmp_path, False, steps)
    assert (args.max_steps, args.get_warmup_steps(args.max_steps)) == (1656, 166)  # 4.40: ceil(0.1 x 1656)
    assert args.eval_steps == 100
    # saved where each of 4.40's epochs ended (a callback's; the Trainer's own saving is off)
    assert (args.save_strategy, across_epochs_saves(recipe, REFERENCE_TRAIN_ROWS)) == ("no", [552, 1105, 1656])
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.seed) == (4, 8, 42)


@needs_phi3_tokenizer
def test_seed_pins_revisions_lengths_stop_tokens_and_sampling_seed():
    from codetune.model import stop_token_ids

    recipe = seed_recipe()
    assert recipe.model.revision == "920b6cf52a79ecff578cc33f61922b23cbc88115"
    assert recipe.data.revision == "7cae181e29701a8663a07a3ea43c8e105b663ba1"
    tok = load_tokenizer(recipe)
    assert tok.model_max_length == 4096 and tok.padding_side == "left" and tok.pad_token_id == 0
    assert stop_token_ids(tok, recipe.generation.stop_tokens) == [32000, 32001, 32007]  # the merged model's eos ids
    assert recipe.generation.seed == 1234 and recipe.evaluation.batch_size == 1


def test_epochs_batch_sampler_shuffles_each_epoch_and_keeps_its_short_batch():
    sampler = EpochsBatchSampler(n_rows=10, batch_size=4, epochs=3, seed=42)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 9
    for e in range(3):
        epoch = batches[3 * e : 3 * e + 3]
        assert [len(b) for b in epoch] == [4, 4, 2]
        assert sorted(i for b in epoch for i in b) == list(range(10))
    assert batches[0:3] != batches[3:6]
    assert list(sampler) == batches  # deterministic: a resumed run sees the same batches


def test_across_epochs_needs_whole_epochs_or_max_steps():
    with pytest.raises(RecipeError, match="accumulation_windows"):
        load_recipe("phi3-mini-python-seed", ["training.epochs=1.5"])
    capped = load_recipe("phi3-mini-python-seed", ["training.epochs=1.5", "training.max_steps=700"])
    assert across_epochs_steps(capped, REFERENCE_TRAIN_ROWS) == (700, 2)  # 5,600 micro-batches: 2 epochs of them


def test_across_epochs_training_runs_the_4_40_step_count(tmp_path, tiny_dir):
    # 21 training rows, batch 2: 11 micro-batches per epoch; accumulation 3: 4.40 made 3 steps per epoch,
    # 9 in all, where per-epoch windows make 4 per epoch (12). Its epochs ended at micro-batches 11, 22 and 33:
    # after steps 3, 7 and 9 (training stops there), where it saved "each epoch". Logging every 3 steps without
    # a first-step log, the logged losses are the means of steps 1-3, 4-6 and 7-9.
    source = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(24))
    recipe = load_recipe(
        "tiny-cpu",
        [
            f"data.source={source}",
            "data.split={test_size: 3, seed: 1}",
            "data.packing=false",
            "data.dedupe=false",
            "data.decontaminate=[]",
            "training.batch_size=2",
            "training.gradient_accumulation_steps=3",
            "training.epochs=3",
            "training.eval_steps=null",
            "training.save_strategy=epoch",
            "training.save_total_limit=null",
            "training.accumulation_windows=across_epochs",
            "training.loss_normalization=micro_batch",
            "training.logging_steps=3",
            "training.logging_first_step=false",
        ],
    )
    result = train(recipe, tmp_path / "run")
    assert load_split(tmp_path / "run", "train").num_rows == 21
    assert result.global_step == across_epochs_steps(recipe, 21)[0] == 9
    metrics = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["train_loss"] is not None] == [3, 6, 9]  # no step-1 window
    assert metrics[-1]["step"] == 9 and metrics[-1]["epoch"] == pytest.approx(27 / 11, abs=1e-3)  # 27 of 33
    saved = sorted(int(p.name.split("-")[-1]) for p in (tmp_path / "run/checkpoints").glob("checkpoint-*"))
    assert saved == across_epochs_saves(recipe, 21) == [3, 7, 9]  # not every 3 steps (3, 6, 9)


# ---------------------------------------------------------------------------------------
# 6: evaluation on the merged model


def test_seed_evaluates_the_merged_model():
    assert load_recipe("phi3-mini-python-seed").evaluation.model == "merged"
    assert load_recipe("phi3-mini-python").evaluation.model == "adapter"


def test_merged_model_gives_the_adapters_logits(tiny_run):
    from peft import PeftModel

    from codetune.generate import load_for_inference
    from codetune.model import load_base_model

    merged = load_for_inference(tiny_run, merged=True)
    assert not isinstance(merged.model, PeftModel)
    assert next(merged.model.parameters()).dtype == torch.float32  # tiny-cpu's compute dtype
    assert not any("Linear4bit" in type(m).__name__ for m in merged.model.modules())
    unmerged = PeftModel.from_pretrained(load_base_model(merged.recipe, quantize=False), str(tiny_run / "adapter"))
    ids = torch.randint(10, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids).logits, unmerged.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_eval_with_a_merged_model_writes_its_kind(tiny_run, tmp_path):
    from codetune.evaluate import evaluate

    recipe = load_recipe(tiny_run / "recipe.yaml", ["evaluation.model=merged", "generation.max_new_tokens=8"])
    summary = evaluate(tiny_run, ["starter"], recipe=recipe, out_dir=tmp_path / "eval", compare_base=True)
    assert summary["model"] == "adapter merged into the base in float32"
    assert set(summary["results"]) == {"fine-tuned", "base"}
    assert summary["results"]["fine-tuned"]["starter"]["samples"] > 0


# ---------------------------------------------------------------------------------------
# 7: padding side


def test_seed_pads_on_the_left_without_position_ids():
    examples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = PaddedRowsCollator(0, "left")(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, 8]]
    assert "position_ids" not in batch
    assert load_recipe("phi3-mini-python-seed").tokenizer.padding_side == "left"


def test_right_padded_rows_are_trls_batches():
    """Unpacked recipes padding on the right get exactly the batches TRL's collator made before."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    gen = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(5, 900, (n,), generator=gen).tolist()} for n in (12, 8, 20, 5)]
    for e in examples:
        e["labels"] = [IGNORE_INDEX] * 3 + e["input_ids"][3:]
    ours, trls = PaddedRowsCollator(3, "right")(examples), DataCollatorForLanguageModeling(pad_token_id=3)(examples)
    assert ours.keys() == trls.keys()
    for key in ours:
        assert torch.equal(ours[key], trls[key]), key


def test_left_padding_changes_the_loss_by_rounding_only(tiny_dir):
    """Left-padded rows sit at shifted positions (no position ids, as in 4.40); rotary attention sees only
    distances, so every target of a row is scored as with right padding, up to float rounding. Left
    padding also adds one target per padded row, as it did in the reference (TRL masked only the pad
    labels): its first token, predicted from the last pad position."""
    from codetune.model import load_base_model

    recipe = load_recipe("tiny-cpu")
    model = load_base_model(recipe, quantize=False).eval()
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, 500, (n,), generator=gen).tolist() for n in (40, 9, 25)]
    examples = [{"input_ids": r, "labels": r} for r in rows]

    def per_target_losses(side):
        b = PaddedRowsCollator(0, side)(examples)
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), b["labels"][:, 1:], reduction="none", ignore_index=IGNORE_INDEX
        )
        trained = b["labels"][:, 1:] != IGNORE_INDEX
        return [ce[i][trained[i]] for i in range(len(rows))]

    left, right = per_target_losses("left"), per_target_losses("right")
    for i, r in enumerate(rows):
        padded = len(r) < 40
        assert len(left[i]) == len(right[i]) + padded == len(r) - 1 + padded
        torch.testing.assert_close(left[i][int(padded) :], right[i], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# 8: the split is kept row for row; bad rows are dropped after it and counted


def test_bad_rows_are_dropped_after_the_split(tmp_path, tiny_dir):
    import datasets

    rows = alpaca_rows(60)
    for i in (3, 17, 41, 55):
        rows[i]["output"] = ""  # empty text, which the reference kept
    rows[8]["instruction"] = None
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    extra = [f"data.source={source}", "data.dedupe=false", "data.decontaminate=[]"]
    extra.append("data.split={test_size: 0.2, seed: 7}")
    bad = {4, 18, 42, 56, 9}  # 1-based source rows

    stats = prepare(load_recipe("tiny-cpu", [*extra, "data.invalid_rows=drop_after_split"]), tmp_path / "a", log=quiet)
    split = datasets.Dataset.from_dict({"i": list(range(60))}).train_test_split(test_size=0.2, seed=7)
    expected_test = [i + 1 for i in split["test"]["i"] if i + 1 not in bad]
    expected_train = {i + 1 for i in split["train"]["i"] if i + 1 not in bad}
    assert load_split(tmp_path / "a", "test")["row"] == expected_test  # the full split's rows, in its order
    assert set(load_split(tmp_path / "a", "train")["row"]) == expected_train
    counts = stats.stats["rows"]
    assert counts["invalid"] == 5 and counts["invalid_train"] + counts["invalid_test"] == 5
    assert counts["invalid_test"] == len([i for i in split["test"]["i"] if i + 1 in bad])
    assert (counts["train_split"], counts["test_split"]) == (48, 12)
    rejected = [json.loads(x) for x in (tmp_path / "a/data/rejected.jsonl").read_text().splitlines()]
    assert {r["row"] for r in rejected} == bad and all(r["split"] in ("train", "test") for r in rejected)

    # the other setting drops them before the split, which moves rows between the splits
    prepare(load_recipe("tiny-cpu", extra), tmp_path / "b", skip_invalid=True, log=quiet)
    assert load_split(tmp_path / "b", "test")["row"] != expected_test
    assert load_recipe("phi3-mini-python-seed").data.invalid_rows == "drop_after_split"
