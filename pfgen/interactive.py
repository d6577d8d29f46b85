"""`--interactive`: prompts typed on stdin while a video is generated.

A daemon thread reads lines and queues them; the story (`pfgen.story`) takes the newest one at the next chunk
boundary (one text-encoder call there), so the chunk loop never waits on stdin. Blank lines are skipped;
closing stdin (Ctrl-D, or the end of a pipe) keeps the current prompt and generation goes on.

stdin is read as bytes and each line decoded on its own, whatever the locale: a line that is not UTF-8 text
(or holds control characters) is skipped with a warning, and the lines around it still apply. If reading
stdin itself fails, the error is queued and raised in the main thread at the next chunk boundary (or at the
end of the run), so the run fails with one line instead of going on without its reader.
"""

from __future__ import annotations

import queue
import re
import sys
import threading
from typing import Callable

from pfgen.errors import PfgenError

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls and DEL, tab allowed


def decode_line(raw: bytes | str, number: int) -> str:
    """One stdin line as a prompt ('' for a blank line); PfgenError for a line that is not text."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise PfgenError(f"stdin line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at position "
                         f"{exc.start}): skipped") from None
    text = text.strip()
    bad = _CONTROL.search(text)
    if bad:
        raise PfgenError(f"stdin line {number} holds a control character ({bad.group()!r}): skipped")
    return text


def read_prompts(stream=None, on_skip: Callable[[str], None] | None = None) -> queue.Queue:
    """Start reading `stream` (default: stdin's bytes) line by line; returns the queue of prompts (stripped,
    non-blank), which ends with a PfgenError if reading fails. `on_skip(message)` for each line skipped."""
    stream = stream if stream is not None else sys.stdin.buffer
    lines: queue.Queue = queue.Queue()

    def reader():
        try:
            for number, raw in enumerate(stream, 1):
                try:
                    text = decode_line(raw, number)
                except PfgenError as exc:
                    if on_skip is not None:
                        on_skip(str(exc))
                    continue
                if text:
                    lines.put(text)
        except Exception as exc:  # handed to the main thread, never lost with this one
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            lines.put(PfgenError(f"--interactive: cannot read stdin: {reason}",
                                 "give --interactive a terminal or a pipe, or leave it out"))

    threading.Thread(target=reader, daemon=True, name="pfgen-stdin").start()
    return lines
