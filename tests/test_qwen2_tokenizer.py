"""Data preparation with the real Qwen2-family tokenizer (../shared/tokenizers/qwen2, see its SOURCE.md)."""

import json

import pytest

from codetune.data import IGNORE_INDEX, load_split
from codetune.prepare import prepare
from codetune.recipe import load_recipe

from .conftest import SHARED, _needs

QWEN2_TOKENIZER = SHARED / "tokenizers" / "qwen2"
pytestmark = _needs(QWEN2_TOKENIZER / "tokenizer.json")

ROWS = [
    {"instruction": "Write a function that adds two numbers.", "input": "", "output": "def add(a, b):\n    return a + b"},
    {"instruction": "Reverse a string.", "input": "s = 'abc'", "output": "def rev(s):\n    return s[::-1]\n"},
    {"instruction": "Square each item.", "input": "", "output": "```python\ndef sq(xs):\n    return [x * x for x in xs]\n```"},
    {"instruction": "Return the maximum.", "input": "[3, 1, 2]", "output": "def biggest(xs):\n    return max(xs)"},
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("qwen2-data")
    source = root / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = load_recipe(
        "qwen2.5-coder-1.5b-python",
        [
            "model.name_or_path=builtin:tiny-qwen2",  # names the qwen2 family; never built here
            f"tokenizer.name_or_path={QWEN2_TOKENIZER}",
            f"data.source={source}",
            "data.revision=null",
            "data.split.test_size=0.25",
            "data.decontaminate=[]",
        ],
    )
    prepare(recipe, root / "run", log=lambda *_: None)
    return AutoTokenizer.from_pretrained(QWEN2_TOKENIZER), load_split(root / "run", "train")


def test_prepared_text_is_the_tokenizers_own_chat_template(prepared):
    tok, train = prepared
    assert len(train) == 3
    for row in train:
        assert row["text"] == tok.apply_chat_template(row["messages"], tokenize=False)
        assert row["text"].startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n")
        assert row["input_ids"] == tok(row["text"], add_special_tokens=False)["input_ids"]


def test_answer_only_mask_is_exactly_the_answer_and_im_end(prepared):
    tok, train = prepared
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for row in train:
        ids, labels = row["input_ids"], row["labels"]
        prompt = tok.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        # one contiguous run: from the first answer token to <|im_end|>, nothing of the prompt, not the newline after
        assert trained == list(range(n_prompt, trained[-1] + 1))
        assert ids[trained[-1]] == im_end and trained[-1] == len(ids) - 2
        assert tok.decode(ids[n_prompt : len(ids) - 1]) == row["messages"][-1]["content"] + "<|im_end|>"
        assert [labels[i] for i in trained] == [ids[i] for i in trained]
