"""Provider keys kept out of what the gate passes back, when a provider echoes the one it got.

Some OpenAI-compatible servers repeat the credential they received, in an error message
("Incorrect API key provided: sk-…") or a header. Every configured provider key is replaced by a
placeholder in the answer's status line, headers, trailers and body (buffered, decoded first
when the provider compressed it; or streamed, a key split across chunks included) before the
caller sees it.

What counts is the whole key, as configured and as a JSON encoder may write it. An echo that
shows only its first and last few characters (the provider's own masking, as OpenAI does) is
left as it is: it cannot be used to call the provider, and matching fragments would hit
ordinary text. A streamed answer the provider compresses (though the gate asks for `identity`)
is scanned as it comes, compressed: only its plain bytes are checked.

The common case, no key in the answer, costs one substring search per key form per body or
stream chunk.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Set

from mitmproxy import http

PLACEHOLDER = "[redacted by tokengate]"
MARK_HEADER = "X-TokenGate-Scrubbed"  # on an answer whose headers had not left yet
MARK = "provider-key"

StreamHook = Callable[[bytes], bytes | Iterable[bytes]]
NONE: frozenset[str] = frozenset()  # no key found


def forms(key: str) -> set[bytes]:
    """The key's bytes as configured, and as JSON writes it (escaped `/`, quotes, non-ASCII)."""
    escaped = json.dumps(key)[1:-1]
    return {key.encode(), escaped.encode(), escaped.replace("/", "\\/").encode()}


def masked(length: int) -> bytes:
    """The placeholder cut or padded to `length` bytes, where the body's length is fixed."""
    return (PLACEHOLDER + "*" * length)[:length].encode()


class Secrets:
    """The provider keys of one configuration: where each is found, and what replaces it."""

    def __init__(self, keys: dict[str, str | None]) -> None:
        """`keys`: provider name -> api_key (None for a keyless provider: nothing to hide)."""
        owners: dict[bytes, str] = {}
        for provider, key in keys.items():
            for form in forms(key) if key else ():
                owners.setdefault(form, provider)
        # Longest first, so that a key containing another is replaced whole.
        self.owners = dict(sorted(owners.items(), key=lambda item: -len(item[0])))
        self.longest = max(map(len, self.owners), default=0)
        self._pattern = re.compile(b"|".join(map(re.escape, self.owners))) if owners else None
        self._key_bytes = frozenset(b"".join(self.owners))

    def __bool__(self) -> bool:
        return bool(self.owners)

    def found(self, data: bytes) -> Set[str]:
        """The providers whose key `data` holds (the hot path: one search per key form)."""
        return {owner for form, owner in self.owners.items() if form in data}

    def replace(self, data: bytes, keep_length: bool = False) -> bytes:
        assert self._pattern is not None
        if keep_length:
            return self._pattern.sub(lambda m: masked(len(m[0])), data)
        return self._pattern.sub(PLACEHOLDER.encode(), data)

    def scrub(self, data: bytes, keep_length: bool = False) -> tuple[bytes, Set[str]]:
        """`data` without any key, and whose keys were in it."""
        for form in self.owners:
            if form in data:
                return self.replace(data, keep_length), self.found(data)
        return data, NONE

    def unfinished(self, data: bytes) -> int:
        """The length of the longest end of `data` that begins a key: bytes to hold back until
        the next chunk tells whether the key follows (always shorter than the longest key)."""
        if not data or data[-1] not in self._key_bytes:
            return 0  # e.g. an SSE event, which ends in a line break: nothing held
        window = data[1 - self.longest :] if self.longest > 1 else b""
        held = 0
        for form in self.owners:
            first = form[:1]
            i = window.find(first, max(0, len(window) - len(form) + 1))
            while i != -1 and len(window) - i > held:
                if form.startswith(window[i:]):
                    held = len(window) - i
                    break
                i = window.find(first, i + 1)
        return held


class StreamScrub:
    """Wraps a response's stream hook (or mitmproxy's plain passthrough when None): what the
    hook passes on is scrubbed, and the end of it that could begin a key is held back until the
    next chunk (flushed at the end of the stream, `b""`)."""

    def __init__(
        self,
        secrets: Secrets,
        inner: StreamHook | None,
        keep_length: bool,
        found: Callable[[Set[str]], None],
    ) -> None:
        self.secrets = secrets
        self.inner = inner
        self.keep_length = keep_length  # the headers gave a Content-Length: the body keeps it
        self.found = found
        self._held = b""

    def __call__(self, chunk: bytes) -> list[bytes]:
        passed = chunk if self.inner is None else self.inner(chunk)
        data = passed if isinstance(passed, bytes) else b"".join(passed)
        if self._held:
            data = self._held + data
        data, owners = self.secrets.scrub(data, self.keep_length)
        if owners:
            self.found(owners)
        held = self.secrets.unfinished(data) if chunk else 0
        if held:
            data, self._held = data[:-held], data[-held:]
        else:
            self._held = b""
        # Never an empty chunk: mitmproxy would write it as the end of a chunked body.
        return [data] if data else []


def scrub_headers(headers: http.Headers, secrets: Secrets) -> Set[str]:
    """Replace any key in the header values (names are left: no key is a header name)."""
    fields = headers.fields
    owners = secrets.found(b"\n".join(value for _, value in fields))
    if owners:
        headers.fields = tuple((name, secrets.replace(value)) for name, value in fields)
    return owners


def scrub_head(response: http.Response, secrets: Secrets) -> Set[str]:
    """The status line's reason phrase and the headers."""
    reason, owners = secrets.scrub(response.data.reason)
    response.data.reason = reason
    return owners | scrub_headers(response.headers, secrets)


def scrub_body(response: http.Response, secrets: Secrets) -> Set[str]:
    """A buffered body and its trailers. A compressed body is searched decoded (mitmproxy keeps
    its last decoding: a body metering has read is not decoded twice) and encoded again when
    changed; setting the content keeps Content-Length right."""
    owners = scrub_headers(response.trailers, secrets) if response.trailers else set()
    body = response.get_content(strict=False)
    if body:
        body, found = secrets.scrub(body)
        if found:
            response.content = body
            owners |= found
    return owners
