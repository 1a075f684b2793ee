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

from pathlib import Path
from typing import IO, Any

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


def describe_key(key: object) -> str:
    """A mapping key fit for an error message: short, one line."""
    text = one_line(str(key))
    if len(text) > _MAX_KEY_SHOWN:
        text = text[:_MAX_KEY_SHOWN] + "..."
    return text


def _load_all(text: str, where: str) -> list[object]:
    # PyYAML is imported when a document is first read, not with this module: the agent
    # imports it on every start and most machines have no document to read (its import is
    # ~0.35 s of the agent's start-up under emulation, the VM tests' guest).
    from gatekeeper.config.yamlread import load_all

    return load_all(text, where)


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
