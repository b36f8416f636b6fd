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


class EventFramer:
    """Cuts a byte stream into whole raw events (each ending in its blank line), unchanged.

    The gate passes a stream on event by event, so that it can drop or add whole events without
    breaking the framing the client parses. Bytes of an event not yet complete are held back;
    `feed(b"")` (end of stream) hands out whatever is left.
    """

    def __init__(self) -> None:
        self._held = bytearray()
        self._scan = 0  # where the next line starts in `_held`

    def feed(self, chunk: bytes) -> list[bytes]:
        if not chunk:
            rest, self._held, self._scan = bytes(self._held), bytearray(), 0
            return [rest] if rest else []
        self._held += chunk
        held = self._held
        events: list[bytes] = []
        start = 0  # where the current event starts
        line = self._scan
        while True:
            cr = held.find(b"\r", line)
            lf = held.find(b"\n", line)
            end = min(i for i in (cr, lf, len(held)) if i != -1)
            if end == len(held):
                break
            if held[end] == 13:  # CR: a line end, unless it is the first half of CRLF
                if end + 1 == len(held):
                    break  # cannot tell yet
                next_line = end + 2 if held[end + 1] == 10 else end + 1
            else:
                next_line = end + 1
            if end == line:  # an empty line ends the event
                events.append(bytes(held[start:next_line]))
                start = next_line
            line = next_line
        del held[:start]
        self._scan = line - start
        return events
