"""Reading one config YAML safely: every way a file can be wrong becomes one ``ConfigError`` line.

Beyond PyYAML's safe loader: a duplicate key in a mapping is refused (YAML would silently keep the last one),
and aliases may not expand the document past ``MAX_EXPANDED_NODES`` nodes (an "alias bomb" of a few hundred
bytes otherwise expands to gigabytes when the tree is copied, merged or printed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from linnaeus.errors import ConfigError

MAX_EXPANDED_NODES = 100_000
MAX_SHOWN = 80
MAX_FILE_BYTES = 16 << 20  # a config is a few KB; anything this large is a wrong path (or /dev/zero)


def short(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters, so an error about a huge value stays one short line."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for Python's digit limit
        text = f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _StrictLoader(yaml.SafeLoader):
    where = "<config>"

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key; the base class reports it
                    continue
                if duplicate:
                    line = key_node.start_mark.line + 1
                    raise ConfigError(
                        f"{self.where} line {line}: duplicate key {short(key)}; YAML would silently keep only one"
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: Node) -> int:
    """Nodes after expanding every alias (shared nodes counted each time they are used), stopping at the bound."""
    memo: dict[int, int] = {}
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in memo:
            continue
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            memo[id(node)] = 1
            continue
        if done:
            memo[id(node)] = min(MAX_EXPANDED_NODES + 1, 1 + sum(memo.get(id(c), 1) for c in children))
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in memo)
    return memo.get(id(root), 1)


def read_yaml_text(text: str, where: str) -> Any:
    loader = _StrictLoader(text)
    loader.where = where
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_EXPANDED_NODES:
            raise ConfigError(
                f"{where}: YAML aliases expand past {MAX_EXPANDED_NODES} nodes; refusing to expand (write the"
                " values out, or use fewer nested aliases)"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}{line}: not valid YAML ({problem})") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer past Python's 4300-digit limit
        raise ConfigError(f"{where}: a value cannot be read ({short(str(err))})") from None
    finally:
        loader.dispose()


def read_yaml_file(path: Path) -> dict[str, Any]:
    """A config file's top-level mapping ({} for an empty file)."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; expected a YAML file")
    try:
        if path.exists() and not path.is_file():  # a device, FIFO or socket: reading it may never end
            raise ConfigError(f"config file {path} is not a regular file; expected a YAML file")
        if path.exists() and path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(
                f"config file {path} is {path.stat().st_size} bytes, over {MAX_FILE_BYTES >> 20} MB; expected a YAML"
                " config of a few KB"
            )
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot be read ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} line {line}: not UTF-8 text (byte {raw[err.start]:#04x}); save it as UTF-8"
        ) from None
    data = read_yaml_text(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level, got {type(data).__name__}")
    return data
