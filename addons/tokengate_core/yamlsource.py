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


def _construct(node: yaml.Node, where: Where, lines: dict[Where, int], path: Path) -> Any:
    lines.setdefault(where, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node, path)
            if key in result:
                raise ConfigError(path, key_node.start_mark.line + 1, f"duplicate key {key!r}")
            lines[(*where, key)] = key_node.start_mark.line + 1
            result[key] = _construct(value_node, (*where, key), lines, path)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct(item, (*where, index), lines, path) for index, item in enumerate(node.value)
        ]
    return _scalar(node, path)


def _scalar(node: yaml.Node, path: Path) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(path, node.start_mark.line + 1, "expected a plain value here")
    return yaml.constructor.SafeConstructor().construct_object(node)


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
    lines: dict[Where, int] = {}
    data = _construct(node, (), lines, path) if node is not None else None
    return Document(path=path, data=data, lines=lines)
