import math
from itertools import combinations

import pytest
from rouge_score import rouge_scorer

from codetune.recipe import RecipeError, load_recipe
from codetune.suites import build_program, extract_code, parses, pass_at_k, rouge_means, rouge_per_sample
from codetune.suites.humaneval import humaneval_tasks
from codetune.suites.mbpp import mbpp_tasks
from codetune.suites.starter import starter_tasks

from .conftest import MBPP_JSONL, needs_mbpp

PAIRS = [
    ("def add(a, b):\n    return a + b", "def add(x, y):\n    return x + y"),
    ("Sorting the numbers in ascending order.", "The numbers are sorted ascending."),
    ("for i in range(10): print(i)", "print(list(range(10)))"),
    ("", "something"),
]


def test_rouge_is_the_cards_per_sample_mean_of_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    expected = {}
    for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        per = [scorer.score(ref, pred)[t].fmeasure * 100 for pred, ref in PAIRS]
        expected[t] = sum(per) / len(per)
    got = rouge_means(rouge_per_sample([p for p, _ in PAIRS], [r for _, r in PAIRS]))
    assert got == pytest.approx(expected, abs=1e-9)
    # the stemmer is on: "sorting"/"sorted" count as the same word
    stemmed = rouge_per_sample(["sorting"], ["sorted"])[0]["rouge1"]
    assert stemmed == 100.0


def test_pass_at_k_is_the_unbiased_estimator():
    for n in (1, 5, 10):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact)
    # by enumeration: the chance that a random k-subset of n samples holds a pass
    samples = [True, False, False, True, False]
    subsets = list(combinations(samples, 2))
    assert pass_at_k(5, 2, 2) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_extract_code():
    fenced = "Here you go:\n```python\ndef f():\n    return 1\n```\nDone."
    assert extract_code(fenced) == "def f():\n    return 1"
    two = "```python\nimport os\n```\ntext\n```python\ndef g(x):\n    return x\n```"
    assert extract_code(two, "g") == "def g(x):\n    return x"
    assert extract_code(two) == "import os\n\ndef g(x):\n    return x"
    assert extract_code("def h():\n    return 2\n") == "def h():\n    return 2"
    assert extract_code("```\nx = 1\n") == "x = 1"  # an unclosed fence still counts
    assert (
        parses("def h():\n    return 2")
        and not parses("def h(:\n")
        and not parses("  \n")
        and not parses("# only a comment")
    )


def test_prompt_formats():
    he = humaneval_tasks()
    assert len(he) == 164
    assert he[0].prompt[0]["content"].startswith("Complete the following Python function.")
    assert "```python\nfrom typing import List" in he[0].prompt[0]["content"]
    starter = starter_tasks()
    assert len(starter) >= 100 and starter[0].prompt[0]["role"] == "user"
    program = build_program(he[0], "def has_close_elements(numbers, threshold):\n    return False")
    assert program.startswith(he[0].preamble) and program.rstrip().endswith("check(has_close_elements)")
    body = build_program(he[0], "    return False\n")
    assert body.startswith(he[0].preamble + "    return False")


@needs_mbpp
def test_mbpp_test_split_and_prompt():
    tasks = mbpp_tasks(str(MBPP_JSONL))
    assert [t.task_id for t in tasks] == [f"mbpp/{i}" for i in range(11, 511)]
    first = tasks[0]
    assert "Your code should pass these tests:" in first.prompt[0]["content"]
    assert first.entry_point and first.entry_point in first.tests


def test_bad_suite_and_sampling_settings():
    with pytest.raises(RecipeError, match="identical samples"):
        load_recipe("tiny-cpu", ["evaluation.n_samples=5", "evaluation.k=[1, 5]"])
    with pytest.raises(RecipeError, match="generation.temperature"):
        load_recipe("tiny-cpu", ["generation.temperature=-0.1"])  # 0 is allowed: greedy
    with pytest.raises(RecipeError, match="generation.top_p"):
        load_recipe("tiny-cpu", ["generation.top_p=1.5"])
    with pytest.raises(RecipeError, match="evaluation.suites"):
        load_recipe("tiny-cpu", ["evaluation.suites=[rouge, apps]"])
