"""The bounded YAML reader behind gatekeeper/config/documents.py (its docstring has the
bounds and why): PyYAML's safe loader (libyaml's when present) refusing duplicate keys,
aliases counted before any value is built, and PyYAML's problems as one line without
quoted input. Imported only when a document is read.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from gatekeeper.config.documents import (
    MAX_EXPANDED_NODES,
    MSG_ALIASES,
    MSG_RECURSIVE,
    describe_key,
)
from gatekeeper.config.errors import ConfigError

# libyaml's parser when PyYAML has it: about 6x faster on a thousand firewall documents.
_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SafeLoader):  # type: ignore[valid-type,misc]
    """SafeLoader that rejects duplicate keys (a silent "last one wins" hides mistakes)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # Built here rather than by SafeConstructor.construct_mapping, so each key is constructed
    # once (checking duplicates first and then letting PyYAML build the dict made every key
    # twice: a fifth of the time to read 1000 firewall documents).
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in mapping
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key is not hashable", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {describe_key(key)}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


# PyYAML quotes input in some problems. Keep what cannot be a secret (one character,
# or its own token names like '<stream end>'); anything longer becomes (...).
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_HARMLESS_QUOTE = re.compile(r"^.(.|\\[a-z0-9]+)?.$|^.<[a-z ]+>.$")


def _scrub_quotes(problem: str) -> str:
    return _QUOTED.sub(lambda m: m[0] if _HARMLESS_QUOTE.match(m[0]) else "(...)", problem)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        problem = _scrub_quotes(exc.problem or exc.context or "syntax error")
        mark = exc.problem_mark or exc.context_mark
        if mark is not None:
            return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
        return f"invalid YAML: {problem}"
    return "invalid YAML"


class _TooManyNodes(Exception):
    pass


class _Recursive(Exception):
    pass


def _expanded_size(root: yaml.Node, budget: int, memo: dict[int, int]) -> int:
    """How many nodes `root` stands for once every alias is expanded; stops past `budget`.

    Iterative (deep nesting must not exhaust Python's stack) and memoised by node identity,
    so a shared node is walked once however often it is referenced: linear in the composed
    nodes, whatever the expansion. Scalars (most nodes) count 1 without a memo entry.
    """
    if isinstance(root, yaml.ScalarNode):
        return 1
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, list[yaml.Node] | None]] = [(root, None)]
    while stack:
        node, children = stack.pop()
        key = id(node)
        if children is not None:
            on_path.discard(key)
            total = 1
            for c in children:
                total += 1 if isinstance(c, yaml.ScalarNode) else memo[id(c)]
            if total > budget:
                raise _TooManyNodes
            memo[key] = total
            continue
        if key in memo:
            continue
        if key in on_path:
            raise _Recursive
        on_path.add(key)
        kids = _children(node)
        stack.append((node, kids))
        stack.extend(
            (c, None) for c in kids if not isinstance(c, yaml.ScalarNode) and id(c) not in memo
        )
    return memo[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load_all(text: str, where: str) -> list[object]:
    """Every document of text, as Python values; ConfigError naming where and which."""
    docs: list[object] = []
    budget = MAX_EXPANDED_NODES
    # An alias is written `*name`, so text without a `*` has none, and each of its nodes takes
    # at least one character of its own, or is the empty value of a key that does: fewer than
    # 2 per character. Such a text, short enough, cannot reach the cap, and the walk counting
    # expansions (a tenth of the time to read 1000 firewall documents) is skipped.
    may_alias = "*" in text or 2 * len(text) + 1 >= MAX_EXPANDED_NODES
    loader = _StrictLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if may_alias:
                budget -= _expanded_size(node, budget, {})
            docs.append(loader.construct_document(node))
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_problem(exc), f"{where} document {len(docs) + 1}") from None
    except _TooManyNodes:
        raise ConfigError(MSG_ALIASES, f"{where} document {len(docs) + 1}") from None
    except _Recursive:
        raise ConfigError(MSG_RECURSIVE, f"{where} document {len(docs) + 1}") from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", where) from None
    except (ValueError, OverflowError):
        # e.g. a timestamp-looking scalar with an impossible date
        raise ConfigError(
            "invalid YAML: a value cannot be read", f"{where} document {len(docs) + 1}"
        ) from None
    finally:
        loader.dispose()
    return docs
