"""One InferenceSession behind every entry point: eval, `codetune generate` / `chat`, the Python API and serve
give the same greedy answer to the same prompt; the stop ids are the family's; the seed makes sampling repeat."""

import copy

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import codetune
from codetune.cli import app
from codetune.evaluate import Task, generate_completions
from codetune.families import builtin_models
from codetune.generate import InferenceSession, TemplateRefused, load_for_inference
from codetune.recipe import RecipeError, load_recipe
from codetune.serve import Engine, create_app

runner = CliRunner()
PROMPT = "Write a Python function `double(x)` that returns 2 * x."
N = 24  # new tokens: enough for the answers to differ when anything does


def test_every_entry_point_gives_the_same_greedy_answer(tiny_run):
    greedy = [f"generation.max_new_tokens={N}", "generation.temperature=0"]
    loaded = load_for_inference(tiny_run, recipe=load_recipe(tiny_run / "recipe.yaml", greedy))
    session = InferenceSession.from_loaded(loaded)
    conversation = [{"role": "user", "content": PROMPT}]

    task = Task(suite="starter", task_id="t", prompt=conversation)
    (evaluated,) = generate_completions(session, [task], loaded.recipe)
    streamed = "".join(session.stream(conversation)).strip()
    api = codetune.load(tiny_run).generate(PROMPT, max_new_tokens=N, temperature=0)
    served = TestClient(create_app(Engine(loaded.model, loaded.tokenizer, loaded.recipe, "tiny", 256))).post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": conversation, "max_tokens": N, "temperature": 0},
    )
    assert served.status_code == 200, served.text
    res = runner.invoke(app, ["generate", str(tiny_run), "--prompt", PROMPT, *(f"--set={s}" for s in greedy)])
    assert res.exit_code == 0, res.output

    answer = evaluated[0]
    assert answer  # an empty answer would make the comparison below say little
    assert streamed == answer
    assert api == answer
    assert served.json()["choices"][0]["message"]["content"].strip() == answer
    assert res.stdout.strip() == answer


@pytest.mark.parametrize("builtin", sorted(builtin_models()))
def test_stop_ids_are_the_family_stop_tokens_and_end_the_answer(builtin):
    import torch
    from transformers import LogitsProcessor

    family = builtin_models()[builtin]
    loaded = load_for_inference(builtin)
    session = InferenceSession.from_loaded(loaded)
    tok = loaded.tokenizer
    assert session.stop_ids == [tok.convert_tokens_to_ids(t) for t in family.stop_tokens]
    assert tok.unk_token_id not in session.stop_ids and len(set(session.stop_ids)) == len(family.stop_tokens)

    end_of_turn = session.stop_ids[0]  # <|end|>, <|im_end|>, <|eot_id|>: the family's own, not the eos

    class EndAfterTwo(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - n_prompt >= 2:
                scores = torch.full_like(scores, -1e9)
                scores[:, end_of_turn] = 0
            return scores

    ids = session.prompt_ids([{"role": "user", "content": "hi"}])
    n_prompt = len(ids)
    answer = session.complete(ids, session.config(max_new_tokens=10, temperature=0), processors=[EndAfterTwo()])
    assert answer.reason == "stop" and answer.tokens == 3  # two tokens, then the stop token, which is not shown


def test_the_seed_makes_sampling_repeat(tiny_dir):
    loaded = load_for_inference(tiny_dir, recipe=load_recipe("tiny-cpu"))
    session = InferenceSession.from_loaded(loaded)
    conversation = [{"role": "user", "content": "Write `inc(x)`."}]
    # the untrained model's next-token distribution is nearly flat: two seeds that sampled alike would be a fluke
    hot = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16)
    first = session.generate([conversation], session.config(seed=7, **hot))
    assert session.generate([conversation], session.config(seed=7, **hot)) == first
    assert session.generate([conversation], session.config(seed=8, **hot)) != first
    ids = session.prompt_ids(conversation)
    one = session.complete(ids, session.config(seed=7, **hot))
    assert session.complete(ids, session.config(seed=7, **hot)) == one
    assert "".join(session.stream(conversation, session.config(seed=7, **hot))) == one.text
    served = TestClient(create_app(Engine(loaded.model, loaded.tokenizer, loaded.recipe, "tiny", 64)))
    body = {"model": "tiny", "messages": conversation, "max_tokens": 16, "temperature": 1.0, "seed": 7}
    texts = [served.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] for _ in "ab"]
    assert texts[0] == texts[1]


def test_a_conversation_the_template_refuses_is_named(tiny_dir):
    loaded = load_for_inference(tiny_dir, recipe=load_recipe("tiny-cpu"))
    tok = copy.deepcopy(loaded.tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turn here') }}{% endif %}"
        "{{ m.content }}{% endfor %}"
    )
    session = InferenceSession(loaded.model, tok, loaded.recipe.generation)
    convs = [[{"role": "user", "content": "a"}], [{"role": "system", "content": "b"}]]
    with pytest.raises(TemplateRefused, match="^conversation 1: the chat template refused them: no system turn here"):
        session.generate(convs)
    assert issubclass(TemplateRefused, RecipeError)  # the CLI reports it in one line
    served = TestClient(create_app(Engine(loaded.model, tok, loaded.recipe, "tiny", 64)))
    res = served.post("/v1/chat/completions", json={"model": "tiny", "messages": convs[1], "max_tokens": 2})
    assert res.status_code == 400 and res.json()["error"]["param"] == "messages"
    assert "the chat template refused them: no system turn here" in res.json()["error"]["message"]


def test_the_chat_loop_keeps_the_history_and_drops_a_turn_that_fails():
    import io

    from codetune.chat_input import converse, piped_turns
    from codetune.generate import ContextError

    seen, notes, errors, out = [], [], [], io.StringIO()

    class Session:
        def stream(self, history):
            seen.append([m["content"] for m in history])
            if history[-1]["content"] == "too long":
                raise ContextError("messages has 9999 tokens")
            yield from ["an ", "answer "]

    script = b"one\ntoo long\ntwo\n/reset\n\xff\nthree\n/exit\nnever read\n"
    converse(Session(), piped_turns(io.BytesIO(script)), note=notes.append, error=errors.append, out=out)
    assert seen == [["one"], ["one", "an answer", "too long"], ["one", "an answer", "two"], ["three"]]
    assert out.getvalue() == "model> an answer \nmodel> \nmodel> an answer \nmodel> an answer \n"
    assert notes == ["(conversation cleared)"]
    assert errors == ["messages has 9999 tokens", "input line 5 is not UTF-8 (invalid start byte at byte 0): skipped"]


def test_the_chat_loop_says_when_an_answer_is_empty():
    import io

    from codetune.chat_input import converse, piped_turns

    class Session:
        def stream(self, history):
            yield from (["def f(): pass"] if len(history) == 1 else [""])  # the second turn: nothing

    out = io.StringIO()
    converse(Session(), piped_turns(io.BytesIO(b"one\ntwo\n")), note=print, error=print, out=out)
    assert out.getvalue() == "model> def f(): pass\nmodel> (empty answer)\n"
