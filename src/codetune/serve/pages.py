"""The pages of ``codetune serve`` for people: the run report at ``GET /`` and a chat page at ``GET /chat``.

The chat page (``chat.html``, ``chat.css``, ``chat.js`` beside this module, read with importlib.resources)
streams this server's own /v1/chat/completions; its script is admitted by the CSP hash of ``chat.js``.
"""

from __future__ import annotations

import functools
import html
import json
from importlib import resources
from pathlib import Path
from string import Template

from ..errors import CodetuneError
from ..report import page, render_report
from ..rundir import RunDir


@functools.cache
def _asset(name: str) -> str:
    return (resources.files(__package__) / name).read_text(encoding="utf-8")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def chat_page(model: str, *, auth: bool = False) -> str:
    key = (
        '<label>API key <input id="key" type=password autocomplete=off></label>'
        if auth
        else '<input id="key" type=hidden value="">'
    )
    body = Template(_asset("chat.html")).substitute(
        css=_asset("chat.css"), model=_e(model), cfg=_e(json.dumps({"model": model})), key=key
    )
    return page(f"chat: {model}", body, _asset("chat.js"), connect=True)


def no_report_page(reason: str) -> str:
    return page("codetune serve", Template(_asset("no_report.html")).substitute(reason=_e(reason)), "")


def add_pages(app, engine, source: str | Path | None, *, auth: bool = False) -> None:
    """``GET /``: the run's report, rendered fresh on each request (an eval may have landed since);
    ``GET /chat``: a chat page that calls this server's own /v1/chat/completions."""
    from fastapi.responses import HTMLResponse

    # plain functions: FastAPI runs them in its thread pool, so reading a large run never stalls generation
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def report_page():
        if source is None or not RunDir(source).recipe_file.is_file():
            return HTMLResponse(no_report_page(f"{source or engine.name} is a model, not a run directory."))
        try:
            return HTMLResponse(render_report(source, chat_link=True))
        except CodetuneError as exc:  # a run with a damaged file (the loaders name it): say which, keep serving
            return HTMLResponse(no_report_page(str(exc)))
        except OSError as exc:  # a file the server may not read, or one removed while it read
            where = f"{exc.filename}: " if exc.filename else ""
            return HTMLResponse(no_report_page(f"{where}{exc.strerror or exc}"))

    @app.get("/chat", response_class=HTMLResponse, include_in_schema=False)
    def chat():
        return HTMLResponse(chat_page(engine.name, auth=auth))
