"""One rule for a prompt near the context (generate, chat, eval and serve share fit_to_context), temperature 0
as greedy everywhere, and a quiet Python API. On the untrained tiny base model: no training needed."""

import subprocess
import sys
import warnings

import pytest
from typer.testing import CliRunner

import codetune
from codetune.cli import app
from codetune.generate import (
    Coder,
    ContextError,
    ContextWarning,
    fit_to_context,
    generate,
    load_for_inference,
    stream,
)
from codetune.recipe import RecipeError, load_recipe

runner = CliRunner()


def test_fit_to_context_refuses_cuts_or_leaves_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits gives no warning at all
        assert fit_to_context([10, 900], 100, 1024) == [100, 100]
    with pytest.warns(ContextWarning, match=r"max_new_tokens cut from 100 to 24 .* context of 1024") as caught:
        assert fit_to_context([1000, 10], 100, 1024) == [24, 100]
    assert len(caught) == 1
    with pytest.warns(ContextWarning, match="^2 prompts, e.g. prompt 0 "):
        assert fit_to_context([1000, 1020, 3], 100, 1024) == [24, 4, 100]
    with pytest.raises(ContextError, match="prompt 1 has 1024 tokens: the model's context is 1024"):
        fit_to_context([10, 1024], 100, 1024)
    with pytest.raises(ContextError, match="^messages has 2000 tokens"):
        fit_to_context([2000], 1, 1024, what="messages")
    assert issubclass(ContextError, RecipeError)  # every command that catches recipe errors reports it in one line


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_for_inference(tiny_dir, recipe=load_recipe("tiny-cpu"))


def _user_prompt_of(loaded, n_tokens: int) -> list[dict]:
    """A one-turn conversation whose templated prompt is exactly n_tokens long."""
    tok = loaded.tokenizer

    def length(text):
        conv = [{"role": "user", "content": text}]
        return len(tok(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))["input_ids"])

    words = tok("word " * n_tokens, add_special_tokens=False)["input_ids"]
    text = tok.decode(words[: n_tokens - length("")])
    while length(text) > n_tokens:
        text = text[:-1]
    return [{"role": "user", "content": text}]


def test_generate_cuts_a_prompt_near_the_context_and_never_runs_past_it(loaded, monkeypatch):
    model, tok = loaded.model, loaded.tokenizer
    context = model.config.max_position_embeddings
    near = _user_prompt_of(loaded, context - 5)
    short = [{"role": "user", "content": "Write `inc(x)`."}]
    cfg = loaded.recipe.generation.model_copy(update={"do_sample": False, "max_new_tokens": 40})
    widths = []
    real = model.generate

    def spy(**kwargs):
        widths.append(kwargs["input_ids"].shape[1] + kwargs["max_new_tokens"])
        return real(**kwargs)

    alone = generate(model, tok, [short], cfg)[0]
    monkeypatch.setattr(model, "generate", spy)
    with pytest.warns(ContextWarning, match=r"^prompt 0 \(\d+ tokens\): max_new_tokens cut from 40 to \d"):
        answers = generate(model, tok, [near, short], cfg, batch_size=2)
    # one batch with both: the near row stopped at the context and the short one went on unchanged
    assert answers[1] == alone
    assert max(widths) <= context
    with pytest.raises(ContextError, match=r"^prompt has \d+ tokens: the model.s context is"):
        generate(model, tok, [_user_prompt_of(loaded, context + 3)], cfg)


def test_chat_stream_follows_the_same_rule(loaded):
    context = loaded.model.config.max_position_embeddings
    cfg = loaded.recipe.generation.model_copy(update={"do_sample": False, "max_new_tokens": 40})
    with pytest.warns(ContextWarning, match="cut from 40 to"):
        pieces = list(stream(loaded.model, loaded.tokenizer, _user_prompt_of(loaded, context - 3), cfg))
    assert len(loaded.tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]) <= 3 + 1
    with pytest.raises(ContextError):
        list(stream(loaded.model, loaded.tokenizer, _user_prompt_of(loaded, context), cfg))


def test_temperature_zero_means_greedy_in_the_api_and_the_recipe(loaded):
    coder = Coder(loaded)
    greedy = coder.generate("Write `inc(x)`.", do_sample=False, max_new_tokens=12)
    # sampling asked for, but at temperature 0: greedy, as OpenAI's API and the server read it
    assert coder.generate("Write `inc(x)`.", do_sample=True, temperature=0, max_new_tokens=12, seed=1) == greedy
    assert coder.generate("Write `inc(x)`.", temperature=0.0, max_new_tokens=12, seed=2) == greedy
    recipe = load_recipe("tiny-cpu", ["generation.do_sample=true", "generation.temperature=0"])
    assert recipe.generation.do_sample is False and recipe.generation.temperature == 0
    with pytest.raises(RecipeError, match=r"(?s)generation settings: .*temperature") as info:
        coder.generate("x", temperature=-1)
    assert "pydantic" not in str(info.value)


def test_cli_generate_takes_temperature_zero_and_warns_in_one_line(loaded, tiny_dir):
    context = loaded.model.config.max_position_embeddings
    near = _user_prompt_of(loaded, context - 4)[0]["content"]
    res = runner.invoke(
        app,
        [
            "generate",
            str(tiny_dir),
            "--recipe",
            "tiny-cpu",
            "--prompt",
            near,
            "--set",
            "generation.temperature=0",
            "--set",
            "generation.max_new_tokens=30",
        ],
    )
    assert res.exit_code == 0, res.output
    warning = [line for line in res.output.splitlines() if "max_new_tokens cut from 30 to" in line]
    assert len(warning) == 1 and warning[0].startswith("warning:")
    assert "ContextWarning" not in res.output and "generate.py" not in res.output


def test_python_api_load_is_quiet(tiny_dir):
    code = (
        "import codetune\n"
        f"coder = codetune.load({str(tiny_dir)!r})\n"
        "print('ANSWER', repr(coder.generate('Write `inc(x)`.', max_new_tokens=4)))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ANSWER" in res.stdout
    # no weight-loading bar, no bitsandbytes notice, no deprecation warnings: nothing at all
    assert res.stderr.strip() == "", res.stderr


def test_quiet_libraries_restores_the_settings(tiny_dir):
    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    assert isinstance(codetune.load(tiny_dir), Coder)
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
