"""`--interactive`: prompts typed on stdin while a video is generated.

A daemon thread reads lines and queues them; the story (`pfgen.story`) takes the newest one at the next chunk
boundary (one text-encoder call there), so the chunk loop never waits on stdin. Blank lines are skipped;
closing stdin (Ctrl-D, or the end of a pipe) keeps the current prompt and generation goes on.
"""

from __future__ import annotations

import queue
import sys
import threading


def read_prompts(stream=None) -> queue.Queue:
    """Start reading `stream` (default stdin) line by line; returns the queue of stripped, non-blank lines."""
    stream = stream if stream is not None else sys.stdin
    lines: queue.Queue = queue.Queue()

    def reader():
        for line in stream:
            if line.strip():
                lines.put(line.strip())

    threading.Thread(target=reader, daemon=True, name="pfgen-stdin").start()
    return lines
