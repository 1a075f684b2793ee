"""Multi-document YAML configuration files (Talos-style ``apiVersion``/``kind`` documents).

Every non-empty document must be a mapping with ``apiVersion: v1alpha1`` and a
string ``kind``. :func:`parse_documents` checks that envelope for all kinds, so
other parts (the firewall's NetworkRuleConfig, ...) reuse it;
:func:`load_documents` picks the SideroLinkConfig and ignores other kinds.

Documents are numbered from 1 in file order, counting empty ones, so a number
in an error matches what a person counts in the file.

Every YAML the product reads goes through here, with two bounds (README "Limits"):

- a file is at most MAX_FILE_BYTES (1 MiB). The largest real input is a firewall policy;
  1000 NetworkRuleConfig documents (bench_firewall.py) are about 200 KB, so 1 MiB leaves five
  times that (1 MiB of rules, about 7,600, parses in under a second on one core);
- aliases may not expand a file beyond MAX_EXPANDED_NODES (1,000,000) nodes. Nodes are
  composed first (an alias is a reference there, not a copy), their expanded total counted
  with memoisation, and only then are Python values built. Without aliases a 1 MiB file holds
  at most about 500,000 nodes, so only alias bombs ("billion laughs") reach the cap; go-yaml,
  which Talos uses, refuses "excessive aliasing" in the same spirit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import IO, Any

import yaml

from gatekeeper.config.errors import ConfigError, one_line
from gatekeeper.config.siderolink import (
    MSG_REQUIRED,
    SideroLinkConfig,
    check_token_size,
    parse_api_url,
)

API_VERSION = "v1alpha1"
SIDEROLINK_KIND = "SideroLinkConfig"
_SIDEROLINK_FIELDS = frozenset({"apiVersion", "kind", "apiUrl", "uniqueToken"})
_MAX_KEY_SHOWN = 40

MAX_FILE_BYTES = 1024 * 1024
MAX_EXPANDED_NODES = 1_000_000
MSG_TOO_LARGE = f"file is larger than {MAX_FILE_BYTES // 1024} KiB"
MSG_ALIASES = (
    f"invalid YAML: aliases expand to more than {MAX_EXPANDED_NODES:,} nodes (an alias bomb?)"
)
MSG_RECURSIVE = "invalid YAML: an alias refers to a node that contains it"


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


def describe_key(key: object) -> str:
    """A mapping key fit for an error message: short, one line."""
    text = one_line(str(key))
    if len(text) > _MAX_KEY_SHOWN:
        text = text[:_MAX_KEY_SHOWN] + "..."
    return text


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


def _load_all(text: str, where: str) -> list[object]:
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


def load_yaml(text: str, where: str) -> object:
    """One YAML value from text that is not a configuration file (a resource's yaml_spec),
    with the same bounds; ConfigError when it is too large, malformed or an alias bomb."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(MSG_TOO_LARGE, where)
    docs = _load_all(text, where)
    return docs[0] if docs else None


def parse_documents(text: str, where: str) -> list[tuple[int, dict[str, Any]]]:
    """(1-based index, mapping) for every non-empty document; checks the envelope of each."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(MSG_TOO_LARGE, where)
    result = []
    for index, doc in enumerate(_load_all(text, where), start=1):
        if doc is None:
            continue
        doc_where = f"{where} document {index}"
        if not isinstance(doc, dict):
            raise ConfigError("document must be a mapping with apiVersion and kind", doc_where)
        for key in doc:
            if not isinstance(key, str):
                raise ConfigError(f"field name {describe_key(key)} is not a string", doc_where)
        kind = doc.get("kind")
        if kind is None or kind == "":
            raise ConfigError("kind is required", doc_where)
        if not isinstance(kind, str):
            raise ConfigError("kind must be a string", doc_where)
        doc_where = f"{doc_where} ({describe_key(kind)})"
        version = doc.get("apiVersion")
        if version is None or version == "":
            raise ConfigError("apiVersion is required", doc_where)
        if version != API_VERSION:
            raise ConfigError(f"apiVersion must be {API_VERSION}", doc_where)
        result.append((index, doc))
    return result


def document_where(where: str, index: int, doc: dict[str, Any]) -> str:
    """The location text used in errors about one document: "<file> document N (<kind>)"."""
    return f"{where} document {index} ({describe_key(doc.get('kind'))})"


def siderolink_from_documents(
    docs: list[tuple[int, dict[str, Any]]], where: str
) -> SideroLinkConfig | None:
    """The one SideroLinkConfig among parsed documents, validated; None if there is none."""
    found: SideroLinkConfig | None = None
    first_index = 0
    for index, doc in docs:
        if doc.get("kind") != SIDEROLINK_KIND:
            continue
        doc_where = document_where(where, index, doc)
        if found is not None:
            raise ConfigError(
                f"only one SideroLinkConfig is allowed (the first is document {first_index})",
                doc_where,
            )
        found = _siderolink_document(doc, doc_where, f"{where} document {index}")
        first_index = index
    return found


def _siderolink_document(doc: dict[str, Any], doc_where: str, source: str) -> SideroLinkConfig:
    unknown = sorted(set(doc) - _SIDEROLINK_FIELDS)
    if unknown:
        raise ConfigError(f"unknown field {describe_key(unknown[0])}", doc_where)
    url = doc.get("apiUrl")
    if url is None or url == "":
        raise ConfigError(MSG_REQUIRED, doc_where)
    if not isinstance(url, str):
        raise ConfigError("apiUrl must be a string", doc_where)
    api = parse_api_url(url, doc_where, document=True)
    unique = doc.get("uniqueToken")
    if unique is not None and not isinstance(unique, str):
        raise ConfigError("uniqueToken must be a string", doc_where)
    check_token_size("uniqueToken", unique, doc_where)
    return SideroLinkConfig(api=api, unique_token=unique or None, source=source)


def read_bounded(stream: IO[bytes], limit: int) -> bytes | None:
    """At most `limit` bytes of a stream, or None when it holds more (read, never stat:
    /proc files report size 0)."""
    data = stream.read(limit + 1)
    return None if len(data) > limit else data


def read_text(path: str | Path) -> str:
    """A config file's text; unreadable, oversized or non-UTF-8 files raise ConfigError."""
    try:
        with Path(path).open("rb") as stream:
            data = read_bounded(stream, MAX_FILE_BYTES)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or type(exc).__name__}", str(path)) from None
    if data is None:
        raise ConfigError(MSG_TOO_LARGE, str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not valid UTF-8 (byte offset {exc.start})", str(path)) from None


def load_documents(path: str | Path) -> SideroLinkConfig | None:
    """The SideroLinkConfig in a multi-document YAML file, or None if the file has none."""
    where = str(path)
    return siderolink_from_documents(parse_documents(read_text(path), where), where)
