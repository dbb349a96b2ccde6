"""What `codetune chat` reads: one user turn at a time, from a terminal or a pipe.

On a terminal, prompt_toolkit gives line editing and history (arrow keys move, they do not
print ``^[[A``); Enter sends, Alt-Enter (or Esc then Enter) adds a line, and pasted text
(bracketed paste) stays one turn however many lines it has. Everywhere, a turn that opens a
code fence (a line starting with three backticks) goes on until the fence closes, so code typed
or piped line by line is one message. A line that is not UTF-8 is reported and skipped; the
session goes on. :func:`converse` is the chat loop itself, over an inference session.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

FENCE = "```"


@dataclass
class BadInput:
    """A line that could not be read as text; the caller reports it and goes on."""

    message: str


def _open_fence(text: str) -> bool:
    return sum(1 for line in text.splitlines() if line.lstrip().startswith(FENCE)) % 2 == 1


def _collect(first: str, more: Callable[[], str | None]) -> str:
    """``first`` plus continuation lines while a code fence is open (input that ends inside it is sent as it is)."""
    text = first
    while _open_fence(text):
        line = more()
        if line is None:
            return text  # input ended inside the fence: send what there is
        text += "\n" + line
    return text


def terminal_turns(prompt: str = "you> ", *, session=None) -> Iterator[str | BadInput]:
    """Turns typed at a terminal, with prompt_toolkit's line editing and history."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    session = session or PromptSession(key_bindings=keys)

    def more() -> str | None:
        try:
            return session.prompt("...> ", key_bindings=keys)
        except (EOFError, KeyboardInterrupt):
            return None

    while True:
        try:
            line = session.prompt(prompt, key_bindings=keys)
        except EOFError:
            return
        except KeyboardInterrupt:
            continue  # Ctrl-C clears the line, as in a shell; Ctrl-D or /exit ends
        yield _collect(line, more)


def piped_turns(stream=None) -> Iterator[str | BadInput]:
    """Turns read from a pipe or file, byte lines decoded one at a time so one bad line costs only itself."""
    stream = stream if stream is not None else sys.stdin.buffer
    lineno = 0

    def next_line() -> str | BadInput | None:
        nonlocal lineno
        raw = stream.readline()
        if not raw:
            return None
        lineno += 1
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            return BadInput(f"input line {lineno} is not UTF-8 ({exc.reason} at byte {exc.start}): skipped")

    def more() -> str | None:
        line = next_line()
        while isinstance(line, BadInput):
            line = next_line()
        return line

    while True:
        line = next_line()
        if line is None:
            return
        if isinstance(line, BadInput):
            yield line
            continue
        yield _collect(line, more)


def turns() -> Iterator[str | BadInput]:
    return terminal_turns() if sys.stdin.isatty() and sys.stdout.isatty() else piped_turns()


EMPTY_ANSWER = "(empty answer)"


def converse(
    session,
    turns: Iterable[str | BadInput],
    *,
    note: Callable[[str], None],
    error: Callable[[str], None],
    out=None,
) -> None:
    """The chat: each turn's answer streamed from ``session`` to ``out`` after ``model> ``, the history kept.

    ``/reset`` starts over, ``/exit`` (or ``/quit``) ends. ``note`` gets the loop's own messages and
    ``error`` a line that could not be read or a turn that could not be answered (a prompt over the
    context, say): that turn leaves the history and the chat goes on.
    """
    from .errors import CodetuneError

    out = out or sys.stdout
    history: list[dict] = []
    for turn in turns:
        if isinstance(turn, BadInput):
            error(turn.message)
            continue
        command = turn.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = []
            note("(conversation cleared)")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": turn})
        parts = []
        print("model> ", end="", flush=True, file=out)
        try:
            for piece in session.stream(history):
                parts.append(piece)
                print(piece, end="", flush=True, file=out)
        except CodetuneError as exc:
            print(file=out)
            error(str(exc))
            history.pop()
            continue
        answer = "".join(parts).strip()
        if not answer:  # the model stopped at once (or wrote only spaces): say so, not a bare prompt
            print(EMPTY_ANSWER, end="", file=out)
        print(file=out)
        history.append({"role": "assistant", "content": answer})
