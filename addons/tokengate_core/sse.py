"""An incremental Server-Sent Events parser (the WHATWG rules), fed arbitrary byte chunks.

Upstream chunks split events, lines and even UTF-8 characters anywhere; lines may end in LF,
CRLF or CR; comments (`: keep-alive`) are skipped. Memory is bounded by the longest line.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    type: str
    data: str


class SSEParser:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # text after the last complete line
        self._skip_lf = False  # the previous chunk ended in CR; a leading LF belongs to it
        self._type = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._decoder.decode(chunk, final=not chunk)
        if self._skip_lf and text.startswith("\n"):
            text = text[1:]
        if text:
            self._skip_lf = text.endswith("\r")
        buffer = self._pending + text
        events: list[Event] = []
        start = 0
        length = len(buffer)
        while start < length:
            cr = buffer.find("\r", start)
            lf = buffer.find("\n", start)
            ends = [i for i in (cr, lf) if i != -1]
            if not ends:
                break
            end = min(ends)
            line = buffer[start:end]
            if buffer[end] == "\r" and end + 1 < length and buffer[end + 1] == "\n":
                start = end + 2
            else:
                start = end + 1
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._pending = buffer[start:]
        if not chunk and self._pending:  # end of stream: a last line without its terminator
            event = self._line(self._pending)
            self._pending = ""
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            if not self._data:
                self._type = ""
                return None
            event = Event(self._type or "message", "\n".join(self._data))
            self._type, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._type = value
        return None
