import json
from pathlib import Path

import datasets
import pytest
from typer.testing import CliRunner

from codetune.cli import app
from codetune.data import IGNORE_INDEX, DataError, load_split, user_content
from codetune.prepare import prepare
from codetune.recipe import load_recipe

runner = CliRunner()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_rows(n: int):
    return [
        {
            "instruction": f"Write a function number {i} that returns {i} squared plus {i % 7}.",
            "input": "" if i % 2 else f"x = {i}",
            "output": f"def f{i}(x):\n    return x * x + {i % 7}",
        }
        for i in range(n)
    ]


def tiny(tmp_path, source, *extra):
    return load_recipe("tiny-cpu", [f"data.source={source}", *extra])


def quiet(*_):
    pass


def test_reference_formatting_is_the_notebooks_join():
    assert user_content("Sort it.", "[9, 3]", "reference") == "Sort it.\n Input: [9, 3]"
    assert user_content("Sort it.", "", "reference") == "Sort it.\n Input: "
    assert user_content("Sort it.", "", "clean") == "Sort it."
    assert user_content("Sort it.", "[9, 3]", "clean") == "Sort it.\nInput: [9, 3]"


def test_split_reproduces_datasets_train_test_split_row_for_row(tmp_path, tiny_dir):
    rows = alpaca_rows(200)
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = tiny(tmp_path, src, "data.split.test_size=0.05", "data.dedupe=false", "data.decontaminate=[]")
    prepare(recipe, tmp_path / "run", log=quiet)
    expected = datasets.Dataset.from_list(rows).train_test_split(test_size=0.05, seed=1234)
    test = load_split(tmp_path / "run", "test")
    train = load_split(tmp_path / "run", "train")
    assert [r["reference"] for r in test] == list(expected["test"]["output"])
    assert [r["reference"] for r in train] == list(expected["train"]["output"])


def test_reference_split_sizes_on_18612_rows():
    # The split depends only on the row count and seed: 18,612 rows -> 17,681 train / 931 test.
    split = datasets.Dataset.from_dict({"i": list(range(18612))}).train_test_split(test_size=0.05, seed=1234)
    assert (len(split["train"]), len(split["test"])) == (17681, 931)


def test_answer_only_labels_mask_the_prompt_and_train_the_end_token(tmp_path, tiny_dir):
    src = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(40))
    recipe = tiny(tmp_path, src)
    prepare(recipe, tmp_path / "run", log=quiet)
    from codetune.model import load_tokenizer

    tok = load_tokenizer(recipe)
    end_id = tok.convert_tokens_to_ids("<|end|>")
    for row in load_split(tmp_path / "run", "train"):
        prompt_text = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tok(prompt_text, add_special_tokens=False)["input_ids"])
        labels = row["labels"]
        assert all(x == IGNORE_INDEX for x in labels[:n_prompt])
        assert labels[n_prompt:] == row["input_ids"][n_prompt:]  # the answer, <|end|> and eos all train
        assert end_id in labels[n_prompt:]
        assert tok.decode(row["input_ids"][n_prompt:], skip_special_tokens=True).strip() == row["reference"].strip()


def test_loss_on_all_trains_every_token(tmp_path, tiny_dir):
    src = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(20))
    prepare(tiny(tmp_path, src, "data.loss_on=all"), tmp_path / "run", log=quiet)
    for row in load_split(tmp_path / "run", "train"):
        assert row["labels"] == row["input_ids"]


def test_chat_rows_train_every_assistant_turn(tmp_path, tiny_dir):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You write Python."},
                {"role": "user", "content": f"first question {i}"},
                {"role": "assistant", "content": f"first answer {i}"},
                {"role": "user", "content": f"second question {i}"},
                {"role": "assistant", "content": f"second answer {i}"},
            ]
        }
        for i in range(20)
    ]
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = tiny(tmp_path, src, "data.format=chat")
    prepare(recipe, tmp_path / "run", log=quiet)
    from codetune.model import load_tokenizer

    tok = load_tokenizer(recipe)
    row = load_split(tmp_path / "run", "train")[0]
    trained = tok.decode([t for t in row["labels"] if t != IGNORE_INDEX], skip_special_tokens=True)
    assert "first answer" in trained and "second answer" in trained
    assert "question" not in trained and "You write Python" not in trained


@pytest.mark.parametrize(
    "row, message",
    [
        ({"input": "", "output": "x = 1"}, "row 3, field 'instruction': missing"),
        ({"instruction": "Do it", "input": "", "output": "   "}, "row 3, field 'output': empty"),
        ({"instruction": "Do it", "input": 5, "output": "x = 1"}, "row 3, field 'input': expected text, got int"),
        ({"instruction": "Do it", "input": "", "output": "\ud800"}, "row 3, field 'output': undecodable text"),
        (["not", "an", "object"], "row 3, field '(row)': expected a JSON object, got list"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, tiny_dir, row, message):
    rows = alpaca_rows(4)
    rows.insert(2, row)
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        prepare(tiny(tmp_path, src), tmp_path / "run", log=quiet)
    assert str(src) in str(info.value) and message in str(info.value)
    assert not (tmp_path / "run" / "data").exists()


def test_undecodable_bytes_name_the_line(tmp_path, tiny_dir):
    src = tmp_path / "bytes.jsonl"
    good = json.dumps(alpaca_rows(1)[0]).encode()
    src.write_bytes(good + b"\n" + b'{"instruction": "caf\xe9", "input": "", "output": "x"}\n')
    with pytest.raises(DataError, match=r"bytes.jsonl, row 2: undecodable text"):
        prepare(tiny(tmp_path, src), tmp_path / "run", log=quiet)


def test_too_long_rows_error_or_drop_or_truncate(tmp_path, tiny_dir):
    rows = alpaca_rows(30)
    split = datasets.Dataset.from_list(rows).train_test_split(test_size=0.1, seed=1234)
    long_idx = rows.index(split["train"][3])  # a row that lands in the training split
    rows[long_idx]["output"] = "\n".join(f"value_{i} = {i} * {i}" for i in range(400))
    src = write_jsonl(tmp_path / "long.jsonl", rows)
    row_re = rf"long.jsonl, row {long_idx + 1}, field 'text': \d+ tokens, longer than data.max_length"
    with pytest.raises(DataError, match=row_re):
        prepare(tiny(tmp_path, src, "data.too_long=error"), tmp_path / "a", log=quiet)
    dropped = prepare(tiny(tmp_path, src, "data.too_long=drop"), tmp_path / "b", log=quiet).stats
    assert dropped["rows"]["too_long_dropped"] == 1 and dropped["rows"]["train_final"] == len(split["train"]) - 1
    kept = prepare(tiny(tmp_path, src, "data.too_long=truncate", "data.packing=false"), tmp_path / "c", log=quiet).stats
    assert kept["rows"]["train_final"] == len(split["train"]) and kept["truncated_share"]["train"] > 0
    assert kept["tokens"]["train"]["max"] == 512


def test_skip_invalid_sets_rows_aside_with_reasons(tmp_path, tiny_dir):
    rows = alpaca_rows(30)
    rows[3] = {"instruction": "", "input": "", "output": "x"}
    rows[7] = {"instruction": "Do it", "output": 3}
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    res = runner.invoke(
        app,
        ["prepare", "tiny-cpu", "--run-dir", str(tmp_path / "run"), "--set", f"data.source={src}", "--skip-invalid"],
    )
    assert res.exit_code == 0, res.output
    rejected = [json.loads(x) for x in (tmp_path / "run/data/rejected.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in rejected] == [(4, "instruction"), (8, "output")]
    assert rejected[0]["reason"] == "empty" and "expected text, got int" in rejected[1]["reason"]
    stats = json.loads((tmp_path / "run/data/stats.json").read_text())
    assert stats["rows"]["invalid"] == 2 and stats["rows"]["valid"] == 28


def test_cli_bad_row_exits_2_and_keeps_earlier_data(tmp_path, tiny_dir):
    run = tmp_path / "run"
    good = write_jsonl(tmp_path / "good.jsonl", alpaca_rows(30))
    assert runner.invoke(app, ["prepare", "tiny-cpu", "-o", str(run), "--set", f"data.source={good}"]).exit_code == 0
    before = {p.name: p.read_bytes() for p in (run / "data").iterdir()}
    bad_rows = alpaca_rows(30)
    bad_rows[10].pop("output")
    bad = write_jsonl(tmp_path / "bad.jsonl", bad_rows)
    res = runner.invoke(app, ["prepare", "tiny-cpu", "-o", str(run), "--set", f"data.source={bad}"])
    assert res.exit_code == 2
    assert "bad.jsonl, row 11, field 'output': missing" in res.output
    assert {p.name: p.read_bytes() for p in (run / "data").iterdir()} == before
    assert sorted(p.name for p in run.iterdir()) == [".codetune.json", "data", "recipe.yaml"]  # no staging left


def test_missing_source_file_names_the_field(tmp_path):
    with pytest.raises(Exception, match="data.source: file not found"):
        prepare(tiny(tmp_path, tmp_path / "nope.jsonl"), tmp_path / "run", log=quiet)


def test_dedupe_is_exact_after_whitespace_normalisation(tmp_path, tiny_dir):
    rows = alpaca_rows(40)
    dup = dict(rows[1], output=rows[1]["output"].replace("    ", "  \t "))
    near = dict(rows[1], output=rows[1]["output"] + " + 0")
    rows += [dup, dict(dup), near]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = tiny(tmp_path, src, "data.split.test_size=0.01", "data.decontaminate=[]")
    stats = prepare(recipe, tmp_path / "run", log=quiet).stats
    split = datasets.Dataset.from_list(rows).train_test_split(test_size=0.01, seed=1234)
    copies_in_train = sum(o.split() == rows[1]["output"].split() for o in split["train"]["output"])
    assert stats["rows"]["duplicates_removed"] == copies_in_train - 1 >= 1


def test_decontamination_against_humaneval_and_test_split(tmp_path, tiny_dir):
    from codetune.suites import load_humaneval

    he = load_humaneval()
    rows = alpaca_rows(60)
    rows.append({"instruction": "Complete this function.", "input": he[0]["prompt"], "output": "pass"})
    rows.append({"instruction": "Finish the code", "input": "", "output": he[10]["prompt"] + "    return 1"})
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    split = datasets.Dataset.from_list(rows).train_test_split(test_size=0.1, seed=1234)
    leaked_test = split["test"][0]
    rows.append(
        {
            "instruction": leaked_test["instruction"] + " Be quick.",
            "input": leaked_test["input"],
            "output": "def g():\n    return 0",
        }
    )
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    split = datasets.Dataset.from_list(rows).train_test_split(test_size=0.1, seed=1234)
    n_he = sum(r["output"] == "pass" or r["output"].endswith("    return 1") for r in split["train"])
    stats = prepare(tiny(tmp_path, src, "data.decontaminate=[test,humaneval]"), tmp_path / "run", log=quiet).stats
    found = [json.loads(x) for x in (tmp_path / "run/data/decontaminated.jsonl").read_text().splitlines()]
    assert stats["rows"]["decontaminated"]["humaneval"] == n_he >= 1
    assert stats["rows"]["decontaminated"]["test"] == sum(f["against"] == "test" for f in found)
    assert all(f["overlap"] for f in found)
    kept = [r["reference"] for r in load_split(tmp_path / "run", "train")]
    assert "pass" not in kept
    # the test split itself is never filtered
    assert len(load_split(tmp_path / "run", "test")) == len(split["test"])


def test_stats_file_is_complete_and_sane(tmp_path, tiny_dir):
    res = prepare(load_recipe("tiny-cpu"), tmp_path / "run", log=quiet)
    s = json.loads((tmp_path / "run/data/stats.json").read_text())
    assert s == json.loads(json.dumps(res.stats))
    rows, tok = s["rows"], s["tokens"]["train"]
    assert rows["read"] >= 100 and rows["train_split"] + rows["test_split"] == rows["valid"]
    assert rows["train_final"] == len(load_split(tmp_path / "run", "train")) == tok["count"]
    assert tok["min"] <= tok["median"] <= tok["p95"] <= tok["max"] <= 512
    assert 0 <= s["truncated_share"]["train"] <= 1
    assert 0 < s["trained_token_share"] < 1  # answer-only: some tokens carry no loss
    pad = s["padding"]
    assert 0 <= pad["packed_share"] < pad["padded_batches_share"] < 1
    assert (tmp_path / "run/recipe.yaml").is_file()
    assert load_recipe(tmp_path / "run/recipe.yaml") == load_recipe("tiny-cpu")


def test_parquet_and_csv_sources(tmp_path, tiny_dir):
    rows = alpaca_rows(30)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    a = prepare(tiny(tmp_path, tmp_path / "d.parquet"), tmp_path / "p", log=quiet).stats["rows"]
    b = prepare(tiny(tmp_path, tmp_path / "d.csv"), tmp_path / "c", log=quiet).stats["rows"]
    assert a == b and a["read"] == 30
