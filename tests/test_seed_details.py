"""The seed recipe's last differences from the reference run (issue 23), one section per point: LoRA precision,
training attention, <unk> labels, stop tokens, decoding, checkpoints, the logged loss, evaluation draws and the
tokenizer check. docs/reproduction.md lists which test pins which point."""

import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from codetune.data import IGNORE_INDEX
from codetune.model import (
    ReferenceTokenizerWarning,
    attach_lora,
    cast_lora_like_trl_0_8_6,
    load_base_model,
    load_tokenizer,
    phi3_mini_config,
)
from codetune.prepare import render, tokenize_example
from codetune.recipe import RecipeError, load_recipe
from codetune.train import (
    _training_arguments,
    across_epochs_saves,
    across_epochs_steps,
    check_hardware,
    training_attention,
)

from .conftest import PHI3_TOKENIZER, PHI3_TOKENIZER_2024_05, needs_phi3_tokenizer
from .test_data import alpaca_rows, write_jsonl

REFERENCE_TRAIN_ROWS = 17_681


def seed_recipe(*overrides):
    return load_recipe("phi3-mini-python-seed", [f"tokenizer.name_or_path={PHI3_TOKENIZER_2024_05}", *overrides])


def _dtypes_by_kind(model) -> dict[str, set]:
    kinds: dict[str, set] = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            kind = "lora"
        elif "embed_tokens" in name or "lm_head" in name:
            kind = "embeddings and head"
        elif "norm" in name:
            kind = "norms"
        else:
            kind = "4-bit weights"
        kinds.setdefault(kind, set()).add(p.dtype)
    return kinds


# ---------------------------------------------------------------------------------------
# 1: LoRA weight precision, as TRL 0.8.6's peft_module_casting_to_bf16 left it


def test_seed_stores_lora_weights_as_trl_0_8_6_did(tmp_path, tiny_dir):
    from safetensors import safe_open

    assert load_recipe("phi3-mini-python-seed").lora.dtype == "bfloat16"
    assert load_recipe("phi3-mini-python").lora.dtype == "float32"
    got = {}
    for dtype in ("bfloat16", "float32"):
        recipe = load_recipe("tiny-cpu", [f"lora.dtype={dtype}", "training.precision=bf16"])
        model = attach_lora(load_base_model(recipe), recipe, gradient_checkpointing=False, bf16=True)
        got[dtype] = _dtypes_by_kind(model)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == got[dtype]["lora"]  # LoRA alone trains
        model.save_pretrained(tmp_path / dtype)
        with safe_open(tmp_path / dtype / "adapter_model.safetensors", "pt") as f:
            got[dtype]["saved"] = {f.get_tensor(k).dtype for k in f.keys()}
    assert got["bfloat16"] == {
        "lora": {torch.bfloat16},
        "embeddings and head": {torch.bfloat16},
        "norms": {torch.float32},
        "4-bit weights": {torch.uint8},
        "saved": {torch.bfloat16},
    }
    # today's behaviour, kept by the improved recipes: prepare_model_for_kbit_training's fp32 everywhere
    assert got["float32"]["lora"] == got["float32"]["embeddings and head"] == got["float32"]["saved"] == {torch.float32}


def test_seed_adapter_is_the_notebooks_17_8_mb():
    """8,912,896 trainable parameters x 2 bytes: the notebook uploaded a 17.8 MB adapter_model.safetensors."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from codetune.model import peft_lora_config

    with torch.device("meta"):
        model = get_peft_model(
            AutoModelForCausalLM.from_config(phi3_mini_config()), peft_lora_config(seed_recipe().lora)
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() * p.element_size() for p in trainable) == 35_651_584  # fp32: codetune before
    cast_lora_like_trl_0_8_6(model)
    assert sum(p.numel() for p in trainable) == 8_912_896
    assert sum(p.numel() * p.element_size() for p in trainable) == 17_825_792


def test_lora_dtype_bfloat16_needs_bf16_training_on_a_4_bit_base():
    for setting in ("training.precision=fp32", "quantization.load_in_4bit=false"):
        with pytest.raises(RecipeError, match="lora.dtype bfloat16"):
            load_recipe("phi3-mini-python-seed", [setting])


# ---------------------------------------------------------------------------------------
# 2: training attention: flash-attention 2 where it runs, else sdpa with a note


def test_seed_trains_with_flash_attention_2_where_it_runs_else_sdpa(monkeypatch):
    import codetune.train as train_module

    seed = load_recipe("phi3-mini-python-seed")
    attn, note = training_attention(seed, cuda=False)
    assert attn == "sdpa" and "no CUDA GPU" in note and "sdpa" in note
    assert check_hardware(seed, cuda=False) is not None  # falls back; never refused
    monkeypatch.setattr(train_module, "flash_attention_2_unavailable", lambda cuda: None)
    assert training_attention(seed, cuda=True) == ("flash_attention_2", None)
    monkeypatch.setattr(train_module, "flash_attention_2_unavailable", lambda cuda: "the flash_attn package is …")
    assert training_attention(seed, cuda=True)[0] == "sdpa"
    # evaluation keeps the model's attention; the improved recipes train with it too
    assert seed.model.attn_implementation == "sdpa"
    assert training_attention(load_recipe("phi3-mini-python"), cuda=True) == ("sdpa", None)
    with pytest.raises(RecipeError, match="training.attn_implementation flash_attention_2 needs a CUDA GPU"):
        check_hardware(load_recipe("tiny-cpu", ["training.attn_implementation=flash_attention_2"]), cuda=False)


def test_flash_attention_2_needs_a_bf16_gpu_and_the_package(monkeypatch):
    import transformers.utils

    from codetune.model import flash_attention_2_unavailable

    assert flash_attention_2_unavailable(False) == "no CUDA GPU"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert "no bf16" in flash_attention_2_unavailable(True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert "flash_attn" in flash_attention_2_unavailable(True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert flash_attention_2_unavailable(True) is None


def test_sdpa_gives_a_left_pad_position_flash_attention_2s_zero_attention(tiny_dir):
    """flash-attention 2 drops pad positions and fills their attention output with zeros. transformers 5.24's
    sdpa masks a left-pad query's whole row and torch returns zeros for it: the same input to o_proj, so the
    one target per padded row that sits on a pad position (the row's first token) scores the same."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    seen = []
    hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    hook.remove()
    assert seen[0][0, :3].abs().max().item() == 0.0
    assert seen[0][0, 3:].abs().min().item() > 0.0


# ---------------------------------------------------------------------------------------
# 3: <unk> labels: every id equal to the pad id is ignored, as transformers 4.40's collator did


def _row_with_unk():
    return [
        {"role": "user", "content": "Replace the token <unk> in a list.\n Input: ['a', '<unk>']"},
        {"role": "assistant", "content": "def clean(xs):\n    return [x for x in xs if x != '<unk>']"},
    ]


def _collator_labels(tokenizer, ids):
    from transformers import DataCollatorForLanguageModeling  # the same masking as 4.40.2's

    return DataCollatorForLanguageModeling(tokenizer, mlm=False)([{"input_ids": ids}])["labels"][0].tolist()


def test_unk_inside_a_text_gets_no_loss_as_the_reference_collator(tiny_dir):
    recipe = load_recipe(
        "tiny-cpu", ["tokenizer.pad_token=<unk>", "data.loss_on=all", "data.ignore_pad_token_labels=true"]
    )
    tok = load_tokenizer(recipe)
    messages = _row_with_unk()
    got = tokenize_example(tok, recipe, messages, render(tok, messages))
    unk = [i for i, t in enumerate(got.input_ids) if t == tok.unk_token_id == tok.pad_token_id]
    assert len(unk) == 3  # the user's two and the answer's
    assert got.labels == _collator_labels(tok, got.input_ids)
    assert [i for i, x in enumerate(got.labels) if x == IGNORE_INDEX] == unk
    default = load_recipe(recipe, ["data.ignore_pad_token_labels=false"])
    trained = tokenize_example(tok, default, messages, render(tok, messages))
    assert trained.labels == trained.input_ids  # codetune's default trains on it
    assert load_recipe("phi3-mini-python-seed").data.ignore_pad_token_labels
    assert not load_recipe("phi3-mini-python").data.ignore_pad_token_labels


@needs_phi3_tokenizer
def test_seed_masks_unk_in_a_real_phi3_row_as_4_40():
    recipe = seed_recipe()
    tok = load_tokenizer(recipe)
    messages = _row_with_unk()
    got = tokenize_example(tok, recipe, messages, render(tok, messages))
    assert got.input_ids.count(0) == 3 and got.input_ids[:2] == [1, 1] and got.input_ids[-1] == 32000
    assert got.labels == _collator_labels(tok, got.input_ids)
    assert [got.labels[i] for i, t in enumerate(got.input_ids) if t == 0] == [IGNORE_INDEX] * 3


# ---------------------------------------------------------------------------------------
# 4: stop tokens: the merged model's generation config (32000, 32001, 32007)


@needs_phi3_tokenizer
def test_seed_stops_on_the_merged_models_three_eos_ids():
    from codetune.generate import InferenceSession

    recipe = seed_recipe()
    session = InferenceSession(_no_model(), load_tokenizer(recipe), recipe.generation)
    assert session.stop_ids == [32000, 32001, 32007]


def test_an_answer_stops_at_any_stop_token(tiny_dir):
    from codetune.generate import InferenceSession

    recipe = load_recipe("tiny-cpu", ['generation.stop_tokens=["<|endoftext|>", "<|assistant|>", "<|end|>"]'])
    tok = load_tokenizer(recipe)
    session = InferenceSession(_no_model(), tok, recipe.generation)
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    session.model = _scripted_model([[20, 21, assistant, 22, 23]])
    assert session._one([5, 6], 8, recipe.generation) == [20, 21]


# ---------------------------------------------------------------------------------------
# 5: decoding as transformers 4.40's text-generation pipeline: clean_up_tokenization_spaces=True


def _no_model():
    return SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096), device=torch.device("cpu"))


def test_clean_up_is_transformers_own():
    from transformers import PreTrainedTokenizerBase

    from codetune.generate import clean_up_tokenization

    text = "from . import x ; a , b ? c ! it ' s do n't I 'm he 's we 've they 're"
    assert clean_up_tokenization(text) == PreTrainedTokenizerBase.clean_up_tokenization(None, text)
    assert clean_up_tokenization("from . import utils") == "from. import utils"


@needs_phi3_tokenizer
def test_seed_decodes_answers_as_the_4_40_pipeline():
    from codetune.generate import InferenceSession, _prompt_ids

    recipe = seed_recipe()
    tok = load_tokenizer(recipe)
    session = InferenceSession(_no_model(), tok, recipe.generation)
    (prompt,) = _prompt_ids(tok, [[{"role": "user", "content": "Import utils , then say you do n't know ."}]])
    answer = tok('from . import utils\nprint("I do n\'t know .")', add_special_tokens=False)["input_ids"] + [32007]
    seed = session.answer_text(prompt, answer, recipe.generation)
    assert seed == 'from. import utils\nprint("I don\'t know.")'
    plain = session.answer_text(prompt, answer, load_recipe("phi3-mini-python").generation)
    assert plain == 'from . import utils\nprint("I do n\'t know .")'  # the improved recipes: no clean-up


# ---------------------------------------------------------------------------------------
# 6: checkpoints where 4.40's epochs ended; 7: the first logging window starts at step 1


def test_seed_saves_where_4_40s_epochs_ended_and_logs_from_step_one(tmp_path):
    recipe = load_recipe("phi3-mini-python-seed")
    assert across_epochs_saves(recipe, REFERENCE_TRAIN_ROWS) == [552, 1105, 1656]
    steps, _ = across_epochs_steps(recipe, REFERENCE_TRAIN_ROWS)
    args = _training_arguments(recipe, tmp_path, False, steps)
    assert args.save_strategy == "no"  # the epoch ends' callback saves, nothing else
    assert args.logging_first_step is False and args.logging_steps == 100
    assert _training_arguments(load_recipe("phi3-mini-python"), tmp_path, False).logging_first_step is True
    capped = load_recipe("phi3-mini-python-seed", ["training.max_steps=700"])
    assert across_epochs_saves(capped, REFERENCE_TRAIN_ROWS) == [552, 700]


# ---------------------------------------------------------------------------------------
# 8: the reference's evaluation order and draws


def _scripted_model(rows: list[list[int]]):
    """A stand-in whose generate() appends the next scripted row to its input."""
    rows = iter(rows)

    def generate(input_ids, **kw):
        return torch.cat([input_ids, torch.tensor([next(rows)])], dim=1)

    return SimpleNamespace(
        config=SimpleNamespace(max_position_embeddings=4096), device=torch.device("cpu"), generate=generate
    )


def _recording(model, calls):
    original = model.generate

    def generate(**kw):
        calls.append(
            {
                "input_ids": kw["input_ids"].tolist(),
                "do_sample": kw["do_sample"],
                "rng": torch.get_rng_state().clone(),
            }
        )
        return original(**kw)

    model.generate = generate
    return model


def test_reference_order_is_set_seed_a_warm_up_then_one_prompt_at_a_time(tiny_dir):
    from transformers import set_seed

    from codetune.evaluate import generate_completions
    from codetune.generate import InferenceSession, _prompt_ids
    from codetune.suites import Task

    recipe = load_recipe(
        "tiny-cpu",
        ["generation.do_sample=true", "generation.max_new_tokens=6", "generation.seed=1234",
         "evaluation.order=reference", "evaluation.batch_size=1"],
    )  # fmt: skip
    tok = load_tokenizer(recipe)
    model = load_base_model(recipe, quantize=False).eval()
    texts = ["Write a function that sorts a list of numbers in place, then prints it.", "Add two.", "Reverse s."]
    tasks = [Task("rouge", f"test/{i}", [{"role": "user", "content": t}]) for i, t in enumerate(texts)]
    prompts = _prompt_ids(tok, [t.prompt for t in tasks])
    calls = []
    session = InferenceSession(_recording(model, calls), tok, recipe.generation, batch_size=1)
    answers = generate_completions(session, tasks, recipe)

    set_seed(1234)
    assert torch.equal(calls[0]["rng"], torch.get_rng_state())  # seeded right before the warm-up
    assert [c["input_ids"] for c in calls] == [[prompts[0]], [prompts[0]], [prompts[1]], [prompts[2]]]
    assert all(c["do_sample"] for c in calls)  # the warm-up is sampled like the rest
    # the same draws by hand, as the notebook: set_seed, test_inference(row 0), then each row in order
    set_seed(1234)
    by_hand = []
    for i, p in enumerate([prompts[0], *prompts]):
        ids = torch.tensor([p])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.3,
                             top_k=50, top_p=0.95, max_new_tokens=6, eos_token_id=session.stop_ids,
                             pad_token_id=session.pad_id)  # fmt: skip
        if i:
            new = out[0, len(p) :].tolist()
            new = next((new[:j] for j, t in enumerate(new) if t in session.stop_ids), new)
            by_hand.append([tok.decode(new, skip_special_tokens=True).strip()])
    assert answers == by_hand

    # the fast order sorts by length and batches: the first prompt, the longest, goes last
    calls.clear()
    fast = load_recipe(recipe, ["evaluation.order=fast", "evaluation.batch_size=4"])
    generate_completions(session, tasks, fast)
    assert len(calls[0]["input_ids"]) == 3 and calls[0]["input_ids"][-1] == prompts[0]


def test_reference_order_is_the_seeds_and_generates_one_at_a_time():
    assert load_recipe("phi3-mini-python-seed").evaluation.order == "reference"
    assert load_recipe("phi3-mini-python").evaluation.order == "fast"
    with pytest.raises(RecipeError, match='evaluation.order "reference" generates one prompt at a time'):
        load_recipe("phi3-mini-python-seed", ["evaluation.batch_size=16"])


# ---------------------------------------------------------------------------------------
# 9: the tokenizer given is checked against the reference's


@needs_phi3_tokenizer
def test_seed_refuses_a_tokenizer_that_is_not_the_references_and_says_what_differs():
    assert load_recipe("phi3-mini-python-seed").tokenizer.reference == "phi3-2024-05"
    load_tokenizer(seed_recipe())  # the 2024-05 files: accepted
    with pytest.raises(RecipeError) as info:
        load_tokenizer(load_recipe("phi3-mini-python-seed", [f"tokenizer.name_or_path={PHI3_TOKENIZER}"]))
    message = str(info.value)
    assert "tokenizer.reference phi3-2024-05" in message and "tokenizer.reference_mismatch: warn" in message
    assert "its own chat template is not the reference's" in message
    # the current revision's special tokens strip the "\n" after <|user|>: the "▁" 29871 is missing
    assert "a known training row: the ids differ from position 3 on" in message and "29871 ('▁')" in message
    assert "its evaluation prompt: the ids differ from position 2 on" in message
    with pytest.raises(RecipeError) as info:  # the right files through transformers 5.24's own class
        load_tokenizer(seed_recipe("tokenizer.encode_with=transformers"))
    assert "chat template" not in str(info.value) and "13 ('<0x0A>') where the reference has 29871" in str(info.value)


@needs_phi3_tokenizer
def test_the_tokenizer_check_can_be_overridden_explicitly():
    recipe = load_recipe(
        "phi3-mini-python-seed", [f"tokenizer.name_or_path={PHI3_TOKENIZER}", "tokenizer.reference_mismatch=warn"]
    )
    with pytest.warns(ReferenceTokenizerWarning, match="position 3"):
        tok = load_tokenizer(recipe)
    assert tok.pad_token_id == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tokenizer(load_recipe("phi3-mini-python-seed", [f"tokenizer.name_or_path={PHI3_TOKENIZER}",
                                                             "tokenizer.reference=null"]))  # fmt: skip


def test_the_tokenizer_check_refuses_a_tokenizer_of_another_vocabulary(tiny_dir):
    """Runs without ../shared: the tiny Phi-3's tokenizer is not the reference's either."""
    recipe = load_recipe("tiny-cpu", ["tokenizer.reference=phi3-2024-05", "tokenizer.chat_template=phi3-2024-05"])
    with pytest.raises(RecipeError, match="a known training row: the ids differ from position"):
        load_tokenizer(recipe)


def test_fixture_holds_the_reference_known_row():
    """The known row the check carries is the fixture's, made with transformers 4.40.2."""
    from pathlib import Path

    from codetune.templates import REFERENCE_TOKENIZERS

    ref = REFERENCE_TOKENIZERS["phi3-2024-05"]
    rows = json.loads((Path(__file__).parent / "fixtures" / "seed_token_ids.json").read_text())["rows"]
    row = next(r for r in rows if r["messages"] == ref.messages)
    assert (row["text"], row["input_ids"], row["prompt_ids"]) == (ref.text, ref.ids, ref.prompt_ids)


# ---------------------------------------------------------------------------------------
# 1 and 2 through the training stage: a bf16 run on the tiny 4-bit Phi-3


def test_bf16_training_saves_a_bf16_adapter_and_says_which_attention_it_used(tmp_path, tiny_dir):
    from io import StringIO

    from rich.console import Console
    from safetensors import safe_open

    from codetune.pipeline import train

    source = write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(12))
    recipe = load_recipe(
        "tiny-cpu",
        [
            f"data.source={source}",
            "data.split={test_size: 2, seed: 1}",
            "data.decontaminate=[]",
            "training.batch_size=2",
            "lora.dtype=bfloat16",
            "training.precision=bf16",
            "training.attn_implementation=flash_attention_2_or_sdpa",
            "training.max_steps=1",
            "training.eval_steps=null",
            "training.save_strategy=no",
        ],
    )
    out = StringIO()
    train(recipe, tmp_path / "run", console=Console(file=out, width=300))
    assert "flash_attention_2_or_sdpa: no CUDA GPU, so training uses sdpa" in out.getvalue()
    with safe_open(tmp_path / "run/adapter/adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
