"""The fast training path: the lean loss, the packed-rows collator, bf16 on CPUs that have it."""

import pytest
import torch
import torch.nn.functional as F

from codetune import loss as lean
from codetune.data import load_split
from codetune.prepare import prepare
from codetune.recipe import load_recipe
from codetune.train import REAL_TOKENS, PackedRowsCollator, cpu_has_fast_bf16, resolve_precision


def quiet(*_):
    pass


def tiny_recipe(*overrides):
    return load_recipe("tiny-cpu", list(overrides))


# ---------------------------------------------------------------------------------------
# Chunked cross-entropy


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_cross_entropy_equals_full_logits(monkeypatch, autocast):
    monkeypatch.setattr(lean, "CHUNK", 70)  # several chunks and a ragged last one
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=g, requires_grad=True)
    weight = torch.randn(200, 32, generator=g) * 0.2
    targets = torch.randint(0, 200, (300,), generator=g)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)

    with ctx:
        ours = lean.chunked_cross_entropy_sum(hidden, weight, targets)
    (0.25 * ours).backward()
    ours_grad, hidden.grad = hidden.grad.clone(), None
    with ctx:
        logits = hidden @ weight.T
    full = F.cross_entropy(logits.float(), targets, reduction="sum")
    (0.25 * full).backward()

    tol = dict(rtol=1e-5, atol=1e-5) if not autocast else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ours, full, **tol)
    torch.testing.assert_close(ours_grad, hidden.grad, **tol)
    assert ours_grad.abs().sum() > 0


def _training_model(recipe, *, lean_loss: bool):
    from codetune.model import attach_lora, load_base_model

    model = load_base_model(recipe)
    if lean_loss:
        assert lean.add_lean_loss(model)
    model = attach_lora(model, recipe, gradient_checkpointing=True)
    with torch.no_grad():  # non-zero LoRA B: every LoRA gradient is non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return model.eval()  # dropout off: both models see the same function


def test_lean_loss_equals_the_models_own_loss_and_gradients(tiny_dir):
    recipe = tiny_recipe()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 900, (3, 40), generator=g)
    labels = ids.clone()
    labels[:, :15] = -100  # a prompt
    labels[2, 30:] = -100  # and padding
    batch = {"input_ids": ids, "labels": labels}

    def loss_and_grads(model, **kw):
        model.zero_grad(set_to_none=True)
        out = model(**batch, **kw)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    lean_out, lean_grads = loss_and_grads(_training_model(recipe, lean_loss=True))
    own_out, own_grads = loss_and_grads(_training_model(recipe, lean_loss=False))
    assert lean_out.logits is None and own_out.logits is not None  # the full logits were never built
    torch.testing.assert_close(lean_out.loss, own_out.loss, rtol=1e-5, atol=1e-6)
    assert lean_grads.keys() == own_grads.keys() and lean_grads
    for name, grad in own_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)

    # the Trainer's token count across gradient accumulation divides the sum, as the model's own loss does
    n = int((labels[:, 1:] != -100).sum())
    lean_sum = _training_model(recipe, lean_loss=True)(**batch, num_items_in_batch=4 * n).loss
    torch.testing.assert_close(lean_sum * 4, own_out.loss, rtol=1e-5, atol=1e-6)


def test_an_adapted_head_falls_back_to_the_models_own_loss(tiny_dir):
    # LoRA on lm_head: the head's weight alone is not the projection any more
    recipe = tiny_recipe("lora.target_modules=[qkv_proj,lm_head]")
    ids = torch.randint(10, 900, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        lean_out = _training_model(recipe, lean_loss=True)(input_ids=ids, labels=ids)
        own_out = _training_model(recipe, lean_loss=False)(input_ids=ids, labels=ids)
    assert lean_out.logits is not None
    torch.testing.assert_close(lean_out.loss, own_out.loss)


def test_lean_loss_leaves_generation_alone_and_survives_an_empty_batch(tiny_dir):
    recipe = tiny_recipe()
    model = _training_model(recipe, lean_loss=True)
    ids = torch.randint(10, 900, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 12, 2048)
    out = model(input_ids=ids, labels=torch.full_like(ids, -100))  # nothing to train in this micro-batch
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------
# Packed rows


def test_packed_rows_keep_examples_apart_and_count_real_tokens(tmp_path, tiny_dir):
    from trl import pack_dataset

    from codetune.model import attach_lora, load_base_model

    recipe = tiny_recipe()
    prepare(recipe, tmp_path / "run", log=quiet)
    rows = load_split(tmp_path / "run", "train").select(range(16)).select_columns(["input_ids", "labels"])
    packed = pack_dataset(rows, 512, strategy="bfd")
    examples = [packed[0], packed[len(packed) - 1]]  # the fullest row and the emptiest
    assert len({len(e["input_ids"]) for e in examples}) > 1  # rows of different lengths: the shorter get a tail
    batch = PackedRowsCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].shape == (len(examples), max(len(e["input_ids"]) for e in examples))
    assert int(batch[REAL_TOKENS]) == sum(len(e["input_ids"]) for e in examples)

    model = attach_lora(load_base_model(recipe), recipe, gradient_checkpointing=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    checked = 0
    for i, e in enumerate(examples):
        start = 0
        for length in e["seq_lengths"]:
            ids = e["input_ids"][start : start + length]
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(logits[i, start : start + length], alone, rtol=1e-4, atol=1e-4)
            assert batch["labels"][i, start] == -100  # nothing predicts an example's first token from another's
            start += length
            checked += 1
        assert (batch["labels"][i, start:] == -100).all()  # the tail is never trained
    assert checked > len(examples)  # rows held several examples each


# ---------------------------------------------------------------------------------------
# Precision


@pytest.mark.parametrize(
    "flags, fast", [("fpu avx512f avx512_bf16 avx512_vnni", True), ("fpu amx_bf16 amx_tile", True), ("fpu avx2", False)]
)
def test_bf16_only_on_cpus_with_bf16_instructions(tmp_path, flags, fast):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_has_fast_bf16(cpuinfo) is fast
    assert cpu_has_fast_bf16(tmp_path / "missing") is False


def test_auto_precision_follows_the_cpu_and_explicit_precision_wins(monkeypatch):
    import codetune.train as train_mod

    for fast in (True, False):
        monkeypatch.setattr(train_mod, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert resolve_precision(tiny_recipe("training.precision=auto"), cuda=False) == (fast, False)
        assert resolve_precision(tiny_recipe("training.precision=fp32"), cuda=False) == (False, False)


def test_training_in_bf16_autocast_runs_and_learns(tmp_path, tiny_dir):
    import json

    from codetune.pipeline import train

    run = tmp_path / "r"
    res = train(
        tiny_recipe("training.precision=bf16", "training.max_steps=16", "training.eval_steps=null", "training.logging_steps=2"),
        run,
    )
    assert res.global_step == 16
    losses = [m["train_loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    losses = [x for x in losses if x is not None]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.9 * losses[0]
