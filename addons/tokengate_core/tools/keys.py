"""Caller keys of quotas.yaml: create, list, revoke, rotate, expire. A running gate reloads live.

    tokengate-keys create PROXY NAME [--expires WHEN]   # prints the secret once
    tokengate-keys list [PROXY] [--ledger PATH]           # never shows secret or hash
    tokengate-keys revoke PROXY NAME
    tokengate-keys rotate PROXY NAME --grace DURATION
    tokengate-keys expire PROXY NAME WHEN
    (each takes --config PATH, default quotas.yaml; `python scripts/keys.py` runs the same)

WHEN is an ISO 8601 time (2026-12-31T23:59:00Z), a duration from now (30s, 15m, 12h, 7d), or
`now`; `expire … never` removes an expiry. Only a key's SHA-256 is written. The file is edited
in YAML round-trip mode, so comments and layout (flow-style mappings included) stay as they
were, validated as the gate would, and replaced in one rename, so a watching gate never reads a
half-written file.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark
from ruamel.yaml.scalarstring import DoubleQuotedScalarString
from ruamel.yaml.tokens import CommentToken

from tokengate_core.config import load_config, parse_duration
from tokengate_core.keys import format_timestamp, generate_key, hash_key, parse_timestamp
from tokengate_core.yamlsource import ConfigError, load_document

# What the gate's audit ledger is called beside the quotas file (rotations: .1, .2, ...).
DEFAULT_LEDGER = Path(".state") / "ledger.jsonl"
MAX_NAME = 64  # the longest key name quotas.yaml accepts (config.py)
# The ledger names a key's secret by this many leading hex digits of its SHA-256 (`key_fp`).
FINGERPRINT_DIGITS = 16


class Refusal(SystemExit):
    """A refusal with a message for the operator; the file is left untouched."""


def parse_when(text: str, now: float) -> float:
    """`now`, a duration from now (7d) or an ISO 8601 time -> epoch seconds."""
    if text == "now":
        return now
    try:
        return now + parse_duration(text)
    except ValueError:
        pass
    try:
        return parse_timestamp(text)
    except ValueError:
        raise Refusal(
            f"error: {text!r} is not a time: use an ISO 8601 time (2026-12-31T23:59:00Z), "
            "a duration from now (30s, 15m, 12h, 7d) or 'now'"
        ) from None


def parse_grace(text: str) -> int:
    """A rotation's grace period: a duration (1h, 7d), or 0s for none."""
    try:
        return 0 if text == "0s" else parse_duration(text)
    except ValueError as e:
        raise Refusal(f"error: --grace: {e}") from None


def _layout(text: str) -> tuple[int, int]:
    """The file's mapping indent and the offset of a sequence's dash under its key.

    ruamel.yaml writes one indentation for the whole file; taking it from the file itself is what
    keeps an untouched part byte-identical.
    """
    mapping, offset, previous, previous_dash = None, None, None, False
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        if previous is not None:
            if mapping is None and previous == 0 and indent > 0:
                mapping = indent
            if offset is None and stripped.startswith("- ") and not previous_dash:
                offset = indent - previous
        previous, previous_dash = indent, stripped.startswith("- ")
    return mapping or 2, max(0, offset if offset is not None else 2)


class QuotasFile:
    """quotas.yaml loaded in round-trip mode, edited in memory, written back atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise Refusal(f"error: cannot read {path}: {e.strerror or e}") from None
        self.text = text
        mapping, offset = _layout(text)
        self.yaml = YAML()
        self.yaml.preserve_quotes = True
        self.yaml.width = 4096  # never re-wrap a long line
        self.yaml.indent(mapping=mapping, sequence=offset + 2, offset=offset)
        try:
            self.data = self.yaml.load(text)
        except YAMLError as e:
            raise Refusal(f"error: {path} is not valid YAML: {e}") from None
        except Exception as e:
            # A value ruamel.yaml cannot construct (the date 2026-02-30, `!!bool maybe`) raises
            # ValueError and the like, without a line; the gate's loader names it.
            try:
                load_document(path)
            except ConfigError as error:
                raise Refusal(f"error: {error}") from None
            raise Refusal(f"error: {path}: {e}") from None

    def proxies(self) -> CommentedMap:
        return (self.data or {}).get("proxies") or CommentedMap()

    def proxy(self, proxy: str) -> CommentedMap:
        proxies = self.proxies()
        if proxy not in proxies:
            have = ", ".join(proxies) or "none"
            raise Refusal(f"error: {self.path}: no proxy {proxy!r} (have: {have})")
        return proxies[proxy]

    def keys(self, proxy: str) -> CommentedMap:
        """The proxy's `keys:` mapping (empty if it has none)."""
        return self.proxy(proxy).get("keys") or CommentedMap()

    def key(self, proxy: str, name: str) -> CommentedMap:
        keys = self.keys(proxy)
        if name not in keys:
            raise Refusal(f"error: {self.path}: proxy {proxy!r} has no key {name!r}")
        return keys[name]

    def save(self) -> None:
        """Write the edited data back (see `replace`)."""
        out = io.StringIO()
        self.yaml.dump(self.data, out)
        self.replace(out.getvalue())

    def replace(self, text: str) -> None:
        """Validate `text` as the gate will, then put it in place of the file in one rename."""
        folder = self.path.resolve().parent
        handle, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
            try:
                # Provider keys live in the gate's environment, not necessarily in this shell's.
                load_config(temp, check_credentials=False)
            except ConfigError as e:
                raise Refusal(
                    f"error: {self.path} left as it was: the edited version would not validate "
                    f"(its line {e.line}: {e.reason})"
                ) from None
            os.chmod(temp, self.path.stat().st_mode & 0o7777)
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def key_entry(secret: str, created: float, expires: float | None) -> CommentedMap:
    """`{sha256: "…", created: "…"[, expires: "…"]}`, one line like the keys already there."""
    entry = CommentedMap(
        [
            ("sha256", DoubleQuotedScalarString(hash_key(secret))),
            ("created", DoubleQuotedScalarString(format_timestamp(created))),
        ]
    )
    if expires is not None:
        entry["expires"] = DoubleQuotedScalarString(format_timestamp(expires))
    entry.fa.set_flow_style()
    return entry


def create(quotas: QuotasFile, proxy: str, name: str, expires: float | None, now: float) -> str:
    if name in quotas.keys(proxy):
        raise Refusal(f"error: {quotas.path}: proxy {proxy!r} already has a key {name!r}")
    entry = quotas.proxy(proxy)
    if entry.get("keys") is None:
        trailing = _take_trailing_comments(entry)
        entry["keys"] = CommentedMap()
    else:
        trailing = _take_trailing_comments(entry["keys"])
    secret = generate_key()
    entry["keys"][name] = key_entry(secret, now, expires)
    if trailing:  # below the new entry, where they were below the old last one
        token = CommentToken("\n" + "".join(trailing), CommentMark(0), None)
        entry["keys"].ca.items[name] = [None, None, token, None]
    return secret


def _take_trailing_comments(node: CommentedMap | CommentedSeq) -> list[str]:
    """Detach the comment lines that follow the last value under `node`, indented as they were.

    ruamel.yaml hangs them on the deepest last item (after its end-of-line comment, or at the
    end of a sequence); a value appended after it would land below them, so it carries them.
    """
    taken = []
    while isinstance(node, CommentedMap | CommentedSeq) and len(node):
        last = list(node)[-1] if isinstance(node, CommentedMap) else len(node) - 1
        slot = 2 if isinstance(node, CommentedMap) else 0  # where ruamel.yaml keeps it
        item = node.ca.items.get(last)
        token = item[slot] if item and len(item) > slot else None
        if token is not None:
            first, newline, rest = token.value.partition("\n")
            if rest:
                token.value = first + newline
                taken.append(rest)
        if node.ca.end:
            taken += [" " * token.column + token.value for token in node.ca.end]
            node.ca.end = []
        node = node[last]
    return taken


def revoke(quotas: QuotasFile, proxy: str, name: str, now: float) -> None:
    """Remove the entry's own lines and leave `# revoked NAME TIME` in their place.

    Done on the text, at the line ruamel.yaml reports: deleting a key from the loaded mapping
    would also drop the comment lines that ruamel.yaml happens to attach to that key.
    """
    quotas.key(proxy, name)
    keys = quotas.keys(proxy)
    if keys.fa.flow_style():  # `keys: {a: …, b: …}` on one line: no comment lines to keep
        del keys[name]
        quotas.save()
        return
    line, column = keys.lc.key(name)
    lines = quotas.text.splitlines(keepends=True)
    end = line + 1
    for index in range(line + 1, len(lines)):
        stripped = lines[index].lstrip(" ")
        if stripped.strip() and not stripped.startswith("#"):
            if len(lines[index]) - len(stripped) <= column:
                break
            end = index + 1  # the entry's own continuation line
    kept = [text for text in lines[line + 1 : end] if text.strip()[:1] in ("", "#")]
    marker = f"{' ' * column}# revoked {name} {format_timestamp(now)}\n"
    quotas.replace("".join([*lines[:line], marker, *kept, *lines[end:]]))


def set_expiry(quotas: QuotasFile, proxy: str, name: str, expires: float | None) -> None:
    entry = quotas.key(proxy, name)
    if expires is None:
        entry.pop("expires", None)
    else:
        entry["expires"] = DoubleQuotedScalarString(format_timestamp(expires))


def rotated_name(name: str, now: float, taken: Container[str]) -> str:
    """`name.rotated-<time>`, not in `taken` (a second rotation within one second gets `-2`, …)."""
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y%m%dT%H%M%S")
    suffixes = (f".rotated-{stamp}" + (f"-{n}" if n > 1 else "") for n in itertools.count(1))
    return next(
        rotated for rotated in (_within_limit(name, s) for s in suffixes) if rotated not in taken
    )


def _within_limit(name: str, suffix: str) -> str:
    """`name + suffix` within the gate's limit on names: a name too long for the suffix is cut
    short and followed by a hash of the whole name, so long names that begin alike stay apart."""
    room = MAX_NAME - len(suffix)
    if len(name) > room:
        name = f"{name[: room - 7]}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"
    return name + suffix


def rotate(
    quotas: QuotasFile, proxy: str, name: str, grace: int, now: float
) -> tuple[str, str, float]:
    """A new secret under `name`; the old one, renamed `name.rotated-<time>`, expires after grace.

    The name stays with the new secret, so the key's history (ledger, budget) goes on under it;
    the renamed old entry shows in `list` with its expiry and last use, which tells when every
    caller has switched. Returns the new secret, the old entry's name and its expiry (the end of
    the grace period, or the earlier expiry it already had).
    """
    entry = quotas.key(proxy, name)
    keys = quotas.keys(proxy)
    old_name = rotated_name(name, now, keys)
    old_entry = CommentedMap(entry)
    old_entry.fa.set_flow_style()
    old_expires = now + grace
    if "expires" in entry and parse_timestamp(entry["expires"]) <= old_expires:
        old_expires = parse_timestamp(entry["expires"])
    else:
        old_entry["expires"] = DoubleQuotedScalarString(format_timestamp(old_expires))
    # The old secret goes in just above; the entry itself (and the comments around it) stays,
    # with the new secret in it.
    keys.insert(list(keys).index(name), old_name, old_entry)
    secret = generate_key()
    expires = parse_timestamp(entry["expires"]) if "expires" in entry else None
    fresh = key_entry(secret, now, expires)  # the key's own expiry goes on with it
    for item in list(entry):
        if item not in fresh:
            del entry[item]
    entry.update(fresh)
    return secret, old_name, old_expires


def ledger_files(ledger: Path) -> list[Path]:
    """The ledger and its rotations (`ledger.jsonl.1`, `.2`, …) that exist."""
    files = [ledger] if ledger.exists() else []
    index = 1
    while (rotation := ledger.with_name(f"{ledger.name}.{index}")).exists():
        files.append(rotation)
        index += 1
    return files


@dataclass
class LastUse:
    """The latest live ledger time per key fingerprint, and per key name for the lines written
    before the ledger carried fingerprints."""

    by_fp: dict[tuple[str, str], str] = field(default_factory=dict)  # (proxy, key_fp) -> time
    by_name: dict[tuple[str, str], str] = field(default_factory=dict)  # (proxy, name) -> time

    def of(self, proxy: str, name: str, entry: Mapping) -> str | None:
        """When the entry's secret was last used. A line without a fingerprint counts for the
        entry of its name only if that entry existed then: after a rotation the name belongs to
        a new secret, and the old one's use is not the new one's."""
        own = self.by_fp.get((proxy, fingerprint(entry)))
        named = self.by_name.get((proxy, name))
        created = _epoch(entry.get("created"))
        if named is not None and created is not None and _epoch(named) < created:
            named = None
        return max(filter(None, (own, named)), default=None)


def _epoch(value: object) -> float | None:
    """A timestamp (as the ledger or quotas.yaml has it) -> epoch seconds; None if it is none."""
    try:
        return parse_timestamp(value)
    except ValueError:
        return None


def fingerprint(entry: Mapping) -> str:
    """The ledger's `key_fp` of a key entry: the first 16 hex digits of its stored SHA-256."""
    return str(entry.get("sha256") or "")[:FINGERPRINT_DIGITS]


def last_used(ledger: Path) -> LastUse:
    """The latest `time` of each key in the ledger and its rotations; replayed captures do not
    count."""
    latest = LastUse()
    for path in ledger_files(ledger):
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if not isinstance(record, dict) or record.get("replay"):
                    continue
                when, fp = record.get("time"), record.get("key_fp")
                if not isinstance(when, str) or _epoch(when) is None:
                    continue
                if isinstance(fp, str):
                    table, who = latest.by_fp, (record.get("proxy"), fp)
                elif isinstance(record.get("key"), str):
                    table, who = latest.by_name, (record.get("proxy"), record["key"])
                else:
                    continue
                if when > table.get(who, ""):
                    table[who] = when
    return latest


def _expiry_text(expires: object, now: float) -> str:
    if expires is None:
        return "never"
    at = parse_timestamp(expires)
    if at <= now:
        return f"{format_timestamp(at)} (expired)"
    return f"{format_timestamp(at)} (in {_span(at - now)})"


def _span(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m" if minutes else f"{int(seconds)}s"
    hours = minutes // 60
    return f"{hours}h{minutes % 60:02d}m" if hours < 48 else f"{hours // 24}d{hours % 24}h"


def listing(quotas: QuotasFile, proxy: str | None, ledger: Path, now: float) -> str:
    used = last_used(ledger)
    rows = [("proxy", "key", "created", "last used", "expires")]
    for proxy_name, entry in quotas.proxies().items():
        if proxy is not None and proxy_name != proxy:
            continue
        for name, key in (entry.get("keys") or {}).items():
            rows.append(
                (
                    proxy_name,
                    name,
                    str(key.get("created") or "-"),
                    used.of(proxy_name, name, key) or "-",
                    _expiry_text(key.get("expires"), now),
                )
            )
    if proxy is not None and proxy not in quotas.proxies():
        raise Refusal(f"error: {quotas.path}: no proxy {proxy!r}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=Path("quotas.yaml"))
    parser = argparse.ArgumentParser(prog="tokengate-keys", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    item = commands.add_parser("create", parents=[common], help="create a key, print it once")
    item.add_argument("proxy")
    item.add_argument("name")
    item.add_argument("--expires", metavar="WHEN")
    item = commands.add_parser("list", parents=[common], help="names, dates, last use, expiry")
    item.add_argument("proxy", nargs="?")
    item.add_argument("--ledger", type=Path, help="default: .state/ledger.jsonl beside --config")
    item = commands.add_parser("revoke", parents=[common], help="remove a key now")
    item.add_argument("proxy")
    item.add_argument("name")
    item = commands.add_parser(
        "rotate", parents=[common], help="new secret; the old one works for --grace more"
    )
    item.add_argument("proxy")
    item.add_argument("name")
    item.add_argument("--grace", required=True, metavar="DURATION", help="e.g. 1h, 7d, 0s")
    item = commands.add_parser("expire", parents=[common], help="set or clear a key's expiry")
    item.add_argument("proxy")
    item.add_argument("name")
    item.add_argument("when", metavar="WHEN", help="time, duration from now, 'now' or 'never'")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    now = time.time()
    quotas = QuotasFile(args.config)
    if args.command == "list":
        ledger = args.ledger or args.config.parent / DEFAULT_LEDGER
        print(listing(quotas, args.proxy, ledger, now))
        return 0
    if args.command == "create":
        expires = parse_when(args.expires, now) if args.expires else None
        secret = create(quotas, args.proxy, args.name, expires, now)
        quotas.save()
        print(f"Created key {args.name!r} for proxy {args.proxy!r}. It is shown only this once:")
        print(secret)
    elif args.command == "revoke":
        revoke(quotas, args.proxy, args.name, now)
        print(f"Revoked key {args.name!r} of proxy {args.proxy!r}.")
    elif args.command == "rotate":
        grace = parse_grace(args.grace)
        secret, old_name, old_expires = rotate(quotas, args.proxy, args.name, grace, now)
        quotas.save()
        print(
            f"Rotated key {args.name!r} of proxy {args.proxy!r}. The old secret is now "
            f"{old_name!r} and works until {format_timestamp(old_expires)}. "
            "The new one is shown only this once:"
        )
        print(secret)
    elif args.command == "expire":
        expires = None if args.when == "never" else parse_when(args.when, now)
        set_expiry(quotas, args.proxy, args.name, expires)
        quotas.save()
        until = "never expires" if expires is None else f"expires {format_timestamp(expires)}"
        print(f"Key {args.name!r} of proxy {args.proxy!r} {until}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
