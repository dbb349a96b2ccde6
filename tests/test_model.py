import re

import pytest
import torch

from codetune.model import load_tokenizer
from codetune.recipe import RecipeError, load_recipe
from codetune.tiny import PHI3_SPECIAL_TOKENS, ensure_tiny_model, resolve_model_path


def test_tiny_model_is_a_phi3_with_phi3_special_tokens(tiny_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dir)
    assert config.model_type == "phi3" and config.vocab_size % 64 == 0
    tok = load_tokenizer(load_recipe("tiny-cpu"))
    for token in PHI3_SPECIAL_TOKENS:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x = 1"}], tokenize=False
    )
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\nx = 1<|end|>\n<|endoftext|>"
    code = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok(code, add_special_tokens=False)["input_ids"]) == code


def test_tiny_model_is_cached_and_rebuilt_identically(tiny_dir, tmp_path, monkeypatch, capsys):
    assert ensure_tiny_model() == tiny_dir  # second call reuses the cache
    assert capsys.readouterr().err == ""
    # two builds in two fresh caches, each with 60 pre-training steps (the cached one took 600: the same code)
    import codetune.tiny as tiny

    build = tiny.build_tiny_model
    monkeypatch.setattr(tiny, "build_tiny_model", lambda out, family=None, **kw: build(out, family, pretrain_steps=60, **kw))
    builds = []
    for home in ("a", "b"):
        monkeypatch.setenv("CODETUNE_HOME", str(tmp_path / home))
        builds.append(ensure_tiny_model())
        assert builds[-1] != tiny_dir
        # the build takes a while: it says what it is doing, in plain lines when stderr is not a terminal
        err = capsys.readouterr().err
        assert "tiny model: training its tokenizer" in err and "tiny model: built" in err
        assert f"once into {builds[-1]} (" in err  # whole lines, never wrapped at 80 columns in a log
        steps = [line for line in err.splitlines() if "pre-training step" in line]
        assert 5 <= len(steps) <= 12 and "| loss " in steps[0] and re.search(r"step (\d+)/\1 ", steps[-1])
        assert "\x1b[" not in err
    again, other = builds
    assert (again / "tokenizer.json").read_text() == (tiny_dir / "tokenizer.json").read_text()
    from safetensors.torch import load_file

    a, b = load_file(again / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() == load_file(tiny_dir / "model.safetensors").keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_model_sources_fail_clearly(tmp_path):
    with pytest.raises(RecipeError, match="unknown builtin model"):
        resolve_model_path("builtin:huge")
    with pytest.raises(RecipeError, match="tokenizer.name_or_path: local path .* does not exist"):
        load_tokenizer(load_recipe("tiny-cpu", [f"tokenizer.name_or_path={tmp_path}/nope"]))
    with pytest.raises(RecipeError, match="tokenizer.pad_token: '<pad>' is not in the tokenizer's vocabulary"):
        load_tokenizer(load_recipe("tiny-cpu", ["tokenizer.pad_token=<pad>"]))


@pytest.mark.parametrize("terminal", [False, True])
def test_build_progress_is_a_bar_on_a_terminal_and_ten_plain_lines_in_a_log(terminal):
    import io

    from rich.console import Console

    from codetune.tiny import BuildProgress

    buf = io.StringIO()
    progress = BuildProgress(Console(file=buf, force_terminal=terminal, width=60))
    progress.say("training its tokenizer with a long message that is wider than the console itself")
    progress.start_pretraining(600)
    for step in range(1, 601):
        progress.step(step, 2.5)
    text = buf.getvalue()
    lines = [line for line in text.splitlines() if "pre-training step" in line]
    if terminal:
        assert lines == [] and "\x1b[" in text and "600/600" in text
    else:
        assert "\x1b[" not in text
        assert "training its tokenizer with a long message that is wider than the console itself (0s)\n" in text
        steps = [line.split(" | ")[0].rsplit(" ", 1)[1] for line in lines]
        assert steps == [f"{s}/600" for s in range(60, 601, 60)]
