"""YAML loading that remembers where each value stood, so config errors can name the line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Where = tuple[str | int, ...]


class ConfigError(ValueError):
    """A quotas file that cannot be used; the message names the file, the line and the reason."""

    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        location = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{location}: {reason}")


@dataclass
class Document:
    """Plain Python data from a YAML file plus the 1-based line of every key path in it."""

    path: Path
    data: Any
    lines: dict[Where, int]

    def line(self, where: Where) -> int | None:
        """The line of `where`, or of the nearest enclosing value that has one."""
        while where:
            if where in self.lines:
                return self.lines[where]
            where = where[:-1]
        return self.lines.get((), 1)

    def error(self, where: Where, reason: str) -> ConfigError:
        return ConfigError(self.path, self.line(where), reason)


# Aliases can make a small file expand enormously ("billion laughs"); no quotas file needs this.
MAX_NODES = 100_000


class _Builder:
    """Turns composed YAML nodes into plain data, recording lines and refusing alias bombs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: dict[Where, int] = {}
        self.nodes = 0
        self._open: set[int] = set()  # nodes being built: meeting one again is a recursive alias

    def build(self, node: yaml.Node, where: Where) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ConfigError(self.path, node.start_mark.line + 1, "too many values (alias bomb?)")
        if id(node) in self._open:
            raise ConfigError(self.path, node.start_mark.line + 1, "recursive alias")
        self.lines.setdefault(where, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            return _scalar(node, self.path)
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, (*where, i)) for i, item in enumerate(node.value)]
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = _scalar(key_node, self.path)
                if key in result:
                    raise ConfigError(
                        self.path, key_node.start_mark.line + 1, f"duplicate key {key!r}"
                    )
                self.lines[(*where, key)] = key_node.start_mark.line + 1
                result[key] = self.build(value_node, (*where, key))
            return result
        finally:
            self._open.discard(id(node))


def _scalar(node: yaml.Node, path: Path) -> Any:
    line = node.start_mark.line + 1
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(path, line, "expected a plain value here")
    try:
        return yaml.constructor.SafeConstructor().construct_object(node)
    except Exception as e:
        # PyYAML converts the text itself, and its errors are not all YAMLErrors: an unquoted
        # 2026-02-30T00:00:00Z raises ValueError, `!!bool maybe` KeyError, `!!timestamp x`
        # AttributeError. Each is the file's fault, so it gets the file's line like any other.
        detail = e.problem if isinstance(e, yaml.MarkedYAMLError) else str(e)
        kind = node.tag.rsplit(":", 1)[-1]
        raise ConfigError(path, line, f"bad value {node.value!r} ({kind}): {detail}") from e


def load_document(path: Path | str) -> Document:
    """Parse `path`; YAML syntax errors become ConfigError with the line PyYAML reports."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not UTF-8 text: {e}") from e
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError(path, line, f"invalid YAML: {e.problem or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(path, None, f"invalid YAML: {e}") from e
    builder = _Builder(path)
    data = builder.build(node, ()) if node is not None else None
    return Document(path=path, data=data, lines=builder.lines)
