"""``codetune report``, and the report and chat pages of ``codetune serve``, checked in a real headless browser.

The browser is Debian's chromium driven by selenium through Debian's chromedriver (never a browser
download); `make test` installs both when run as root, and the browser tests skip without them.
"""

import html
import json
import re
import shutil
import struct

import pytest
from typer.testing import CliRunner

from codetune.cli import app
from codetune.recipe import RecipeError
from codetune.report import load_samples, render_report, write_report

from .test_serve import LiveServer

runner = CliRunner()

# Untrusted model output that would run if any of it reached the page unescaped.
PAYLOAD = '</script><script>window.__pwned = 1; alert(1)</script><img src=x onerror="window.__pwned = 2">'

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no chromium + chromedriver here: `apt-get install chromium chromium-driver` "
    "(`make test` installs them when run as root)",
)


def _row(task_id, completion, passed, *, error=None, code=None):
    return {
        "task_id": task_id,
        "prompt": [{"role": "user", "content": f"Write a Python function for {task_id}."}],
        "reference": "def f():\n    return 1\n",
        "completion": completion,
        "code": completion if code is None else code,
        "parses": True,
        "scores": {"passed": passed},
        "verdict": "passed" if passed else "failed",
        "error": None if passed else (error or "AssertionError"),
    }


# (task, base passed, fine-tuned passed): one fixed, one broken, one kept, two still failing
STARTER = [
    ("starter/3", True, True),
    ("starter/4", False, False),
    ("starter/1", False, True),
    ("starter/5", False, False),
    ("starter/2", True, False),
]


def make_run(run):
    """A run directory with hand-written training metrics and evaluation files."""
    (run / "eval" / "base").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: handmade\nmodel:\n  name_or_path: builtin:tiny-phi3\n")
    metrics = [{"step": s, "train_loss": 4.0 - 0.1 * s, "eval_loss": None, "learning_rate": 1e-3} for s in range(1, 21)]
    metrics += [{"step": s, "train_loss": None, "eval_loss": 3.5 - 0.05 * s} for s in (10, 20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    tuned, base = [], []
    for tid, b, t in STARTER:
        evil = tid == "starter/4"
        answer = PAYLOAD if evil else f"def f():\n    return '{tid} tuned'"
        tuned.append(_row(tid, answer, t, error=PAYLOAD if evil else None))
        base.append(_row(tid, f"def f():\n    return '{tid} base'", b))
    rouge_t = [_row("test/0", PAYLOAD, None), _row("test/1", "x = 1", None)]
    rouge_b = [_row("test/0", "", None), _row("test/1", "y", None)]
    for rows in (rouge_t, rouge_b):
        for r in rows:
            r.update(verdict=None, error=None, scores={"rougeL": 12.5})
            del r["code"]
    for path, rows in {
        "eval/starter.jsonl": tuned,
        "eval/base/starter.jsonl": base,
        "eval/rouge.jsonl": rouge_t,
        "eval/base/rouge.jsonl": rouge_b,
    }.items():
        (run / path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "source": str(run),
        "suites": ["rouge", "starter"],
        "results": {
            "fine-tuned": {
                "rouge": {"samples": 2, "rouge1": 20.0, "rouge2": 2.0, "rougeL": 12.5, "rougeLsum": 20.0},
                "starter": {"tasks": 5, "samples": 5, "n_per_task": 1, "pass@1": 40.0, "parse_rate": 100.0},
            },
            "base": {
                "rouge": {"samples": 2, "rouge1": 1.0, "rouge2": 0.0, "rougeL": 1.0, "rougeLsum": 1.0},
                "starter": {"tasks": 5, "samples": 5, "n_per_task": 1, "pass@1": 40.0, "parse_rate": 80.0},
            },
        },
    }
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    return run


def _links(text: str) -> list[str]:
    """Every src and href of the page's real tags (escaped text makes none), but links within the page."""
    from html.parser import HTMLParser

    found = []

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(v for k, v in attrs if k in ("src", "href", "xlink:href") and not v.startswith("#"))

    Links().feed(text)
    return found


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run")


# ---------------------------------------------------------------------------------------
# The file


def test_report_is_one_offline_file_with_curves_tables_and_samples(run):
    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    path = run / "report.html"
    assert str(path) in res.output
    text = path.read_text()
    assert not list(run.glob(".report-*"))  # the temporary file was renamed into place
    # self-contained: no tag points anywhere but inside the page, and no URL but the SVG namespaces
    assert _links(text) == ["data:,"]
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) <= {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
    }
    assert "<svg" in text and "training loss" in text and "validation loss" in text
    assert "last training loss 2.0000 (step 20)" in text and "last validation loss 2.5000 (step 20)" in text
    # the tables: both models, the change
    assert '<td class="num">40.0</td><td class="num">40.0</td><td class="num">+0.0</td>' in text
    assert '<td>rougeL</td><td class="num">12.50</td><td class="num">1.00</td><td class="num up">+11.50</td>' in text
    # the samples, what changed first
    samples = load_samples(run / "eval")
    assert [(s.task_id, s.change) for s in samples[:2]] == [("starter/1", "fixed"), ("starter/2", "broke")]
    assert [s.suite for s in samples[2:]] == ["starter"] * 3 + ["rouge"] * 2
    assert text.index("starter/1") < text.index("starter/2") < text.index("starter/3")
    assert "fixed 1 and broke 1" in text
    elsewhere = run.parent / "reports" / "mine.html"
    res = runner.invoke(app, ["report", str(run), "--out", str(elsewhere)])
    assert res.exit_code == 0 and elsewhere.read_text().count('class="sample"') == 7


def test_untrusted_completions_are_escaped(run):
    text = render_report(run)
    assert PAYLOAD not in text and "<script>window.__pwned" not in text
    assert text.count(html.escape(PAYLOAD, quote=True)) == 3  # starter/4's answer and error, test/0's answer
    assert text.count("<script") == 1  # the page's own filter script, nothing else
    assert _links(text) == ["data:,"]  # no <img src=x> either


def test_report_errors_name_the_file_and_keep_the_earlier_report(run, tmp_path):
    earlier = write_report(run).read_bytes()
    with (run / "eval" / "starter.jsonl").open("a") as fh:
        fh.write("{not json\n")
    res = runner.invoke(app, ["report", str(run), "--overwrite"])  # a report codetune wrote: replaced when asked
    assert res.exit_code == 2 and "starter.jsonl, row 6: not valid JSON" in res.output
    assert (run / "report.html").read_bytes() == earlier
    assert not list(run.glob(".report-*"))
    res = runner.invoke(app, ["report", str(tmp_path / "no-such-run")])
    assert res.exit_code == 2 and "no such run directory" in res.output
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="nothing to report"):
        render_report(tmp_path / "empty")


def test_report_of_an_untrained_or_unevaluated_run(run, tmp_path):
    shutil.rmtree(run / "eval")
    text = render_report(run)
    assert "Not evaluated yet" in text and "<svg" in text
    only_eval = tmp_path / "eval-out"  # an `eval --out DIR` folder
    shutil.copytree(make_run(tmp_path / "other") / "eval", only_eval)
    text = render_report(only_eval)
    assert "No training metrics" in text and "starter/1" in text


# ---------------------------------------------------------------------------------------
# In the browser


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(needs_browser.kwargs["reason"])
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: selenium never runs its manager, which would download one
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _errors(driver) -> list[dict]:
    """The console's errors since the last call (a blocked script or a 404 shows up here too)."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _visible(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [
        r.find_element(By.CLASS_NAME, "tid").text
        for r in driver.find_elements(By.CSS_SELECTOR, ".sample")
        if r.is_displayed()
    ]


def _click(driver, name):
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f'.controls button[data-filter="{name}"]').click()


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 600
    from PIL import Image

    with Image.open(path) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # a rendered page, not a blank one


def check_report_in_browser(driver, url, screenshot):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _errors(driver)
    driver.get(url)
    assert driver.title.startswith("codetune report")
    # the page's script ran (its CSP hash matches) and wrote the count
    assert driver.find_element(By.ID, "shown").text == "7 of 7 shown"
    assert _errors(driver) == []
    # nothing of the payload ran; it shows as text
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018
    assert driver.execute_script("return window.__pwned === undefined")
    assert len(driver.find_elements(By.CSS_SELECTOR, "img")) == 0
    (evil,) = [r for r in driver.find_elements(By.CSS_SELECTOR, ".sample") if "starter/4" in r.text]
    evil.find_element(By.TAG_NAME, "summary").click()
    assert PAYLOAD in evil.text

    assert _visible(driver)[:2] == ["starter/1", "starter/2"]
    _click(driver, "changed")
    assert _visible(driver) == ["starter/1", "starter/2"]
    _click(driver, "passed")
    assert sorted(_visible(driver)) == ["starter/1", "starter/3"]
    _click(driver, "failed")
    assert sorted(_visible(driver)) == ["starter/2", "starter/4", "starter/5"]
    assert driver.find_element(By.ID, "shown").text == "3 of 7 shown"
    _click(driver, "all")
    Select(driver.find_element(By.ID, "suite")).select_by_value("rouge")
    assert _visible(driver) == ["test/0", "test/1"]
    Select(driver.find_element(By.ID, "suite")).select_by_value("all")
    driver.find_element(By.ID, "search").send_keys("starter/5")
    assert _visible(driver) == ["starter/5"]
    driver.find_element(By.ID, "search").clear()
    driver.execute_script("document.getElementById('search').dispatchEvent(new Event('input'))")
    assert len(_visible(driver)) == 7
    # open the fixed task to show both answers side by side
    driver.find_elements(By.CSS_SELECTOR, ".sample summary")[0].click()
    driver.execute_script("document.getElementById('samples').scrollIntoView()")
    assert _errors(driver) == []
    driver.save_screenshot(str(screenshot))
    _check_png(screenshot)


@needs_browser
def test_report_in_a_headless_browser(browser, run, tmp_path):
    path = write_report(run)
    check_report_in_browser(browser, path.as_uri(), tmp_path / "report.png")


# ---------------------------------------------------------------------------------------
# codetune serve: the report at / and the chat page


@pytest.fixture(scope="module")
def served_run(tiny_run, tmp_path_factory):
    """A copy of the shared tiny run (a real adapter and metrics) with the hand-written evaluation files."""
    run = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval", "report.html"))
    handmade = make_run(tmp_path_factory.mktemp("handmade") / "run")
    shutil.copytree(handmade / "eval", run / "eval")
    return run


@pytest.fixture(scope="module")
def engine(served_run):
    from codetune.serve import load_engine

    return load_engine(served_run, name="tiny", max_tokens_limit=256)


def test_serve_pages_over_http(engine, served_run):
    import dataclasses

    from fastapi.testclient import TestClient

    from codetune.serve import create_app

    client = TestClient(create_app(engine, api_key="k"))
    assert client.get("/").status_code == 401  # the report names the run's prompts and path: behind the key
    client.auth = ("anyone", "k")  # HTTP Basic, the key as password: what a browser's prompt sends
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "codetune report: tiny-cpu" in page.text and 'href="/chat"' in page.text
    assert html.escape(PAYLOAD, quote=True) in page.text and PAYLOAD not in page.text
    assert not (served_run / "report.html").exists()  # the server renders, it never writes into the run
    chat = client.get("/chat")
    assert chat.status_code == 200 and 'id="key" type=password' in chat.text  # auth on: the page asks for the key
    assert client.get("/v1/models", auth=("anyone", "wrong")).status_code == 401  # the API stays behind the key
    merged = TestClient(create_app(dataclasses.replace(engine, source="some/merged-model")))
    assert "is a model, not a run directory" in merged.get("/").text


@needs_browser
def test_serve_report_and_chat_in_a_headless_browser(browser, engine, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from codetune.serve import create_app

    prompt = "Write a Python function `double(x)` that returns 2 * x."
    with LiveServer(create_app(engine)) as url:
        check_report_in_browser(browser, f"{url}/", tmp_path / "served-report.png")
        browser.find_element(By.LINK_TEXT, "chat with the model").click()
        WebDriverWait(browser, 10).until(lambda d: d.current_url == f"{url}/chat")
        assert _errors(browser) == []
        max_tokens = browser.find_element(By.ID, "max")
        max_tokens.clear()
        max_tokens.send_keys("40")
        browser.find_element(By.ID, "prompt").send_keys(prompt)
        browser.find_element(By.ID, "send").click()
        done = WebDriverWait(browser, 120).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.assistant[data-done="1"]')
        )
        shown = browser.execute_script("return arguments[0].textContent", done[0])
        # what the page streamed is what the API answers to the same request
        expected = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 40},
            timeout=120,
        ).json()["choices"][0]["message"]["content"]
        assert shown and shown == expected
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == prompt
        assert _errors(browser) == []
        browser.save_screenshot(str(tmp_path / "chat.png"))
        _check_png(tmp_path / "chat.png")
    # with auth on, the page itself needs the key (HTTP Basic, the key as password: here in the URL, as a
    # person types it into the browser's prompt); a wrong key typed into its field gets the server's error
    with LiveServer(create_app(engine, api_key="k")) as url:
        browser.get(url.replace("http://", "http://anyone:k@") + "/chat")
        browser.find_element(By.ID, "key").send_keys("wrong")
        browser.find_element(By.ID, "prompt").send_keys("hello")
        browser.find_element(By.ID, "send").click()
        err = WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert "missing or wrong API key" in err[0].text
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        _errors(browser)  # the 401 itself is logged as a failed resource load: expected here
