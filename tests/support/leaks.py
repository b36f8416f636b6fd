"""Searching what a run left behind for secrets, in every form a secret could be written down."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import quote

from mitmproxy import io


def forms(secret: str) -> list[bytes]:
    """The ways a secret could be written down: as is, base64 (alone or as a Bearer header),
    URL-encoded."""
    raw = secret.encode()
    return [
        raw,
        base64.b64encode(raw),
        base64.b64encode(b"Bearer " + raw),
        base64.urlsafe_b64encode(raw),
        quote(secret, safe="").encode(),
        quote(f"Bearer {secret}", safe="").encode(),
    ]


def leaks(data: bytes, secrets: tuple[str, ...]) -> list[str]:
    return [secret for secret in secrets for form in forms(secret) if form in data]


def flow_fields(path: Path) -> bytes:
    """Everything a saved flow holds, decoded: URL, headers, bodies (decompressed), metadata,
    comment, error."""
    parts: list[str] = []
    with path.open("rb") as file:
        for flow in io.FlowReader(file).stream():
            request, response = flow.request, flow.response
            parts += [request.url, str(request.headers.fields), str(flow.metadata), flow.comment]
            parts.append((request.get_content(strict=False) or b"").decode("latin-1"))
            if response is not None:
                parts.append(str(response.headers.fields))
                parts.append((response.get_content(strict=False) or b"").decode("latin-1"))
            if flow.error:
                parts.append(flow.error.msg)
    return "\n".join(parts).encode("utf-8", "surrogateescape")
