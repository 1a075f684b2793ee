"""talosctl-shaped output for resources: table, YAML and JSON. Pure functions over messages."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import yaml

from gatekeeper.maintenance.client import TypeInfo, spec_dict
from gatekeeper.pb.cosi import resource_pb2, state_pb2

BASE_COLUMNS = ("NODE", "NAMESPACE", "TYPE", "ID", "VERSION")
# talosctl's watch marks: created, updated, destroyed.
EVENT_MARKS = {state_pb2.CREATED: "+", state_pb2.UPDATED: " ", state_pb2.DESTROYED: "-"}


def json_path(data: Any, template: str) -> str:
    """The small part of kubectl JSONPath that printed columns use: `{.a.b}`, `{.list[:]}`."""
    path = template.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    value = data
    for part in filter(None, path.lstrip(".").split(".")):
        whole_list = part.endswith("[:]")
        key = part[:-3] if whole_list else part
        value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            return ""
    return _scalar(value)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(_scalar(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def table(
    node: str,
    info: TypeInfo,
    resources: Sequence[resource_pb2.Resource],
    *,
    marks: Sequence[str] | None = None,
    header: bool = True,
) -> str:
    """Aligned columns: NODE NAMESPACE TYPE ID VERSION, then the type's print columns."""
    head = list(BASE_COLUMNS) + [name.upper() for name, _ in info.print_columns]
    if marks is not None:
        head.insert(1, "*")
    rows = []
    for i, r in enumerate(resources):
        md = r.metadata
        spec = spec_dict(r) or {}
        row = [node, md.namespace, info.display_type, md.id, md.version]
        row += [json_path(spec, path) for _, path in info.print_columns]
        if marks is not None:
            row.insert(1, marks[i])
        rows.append(row)
    lines = ([head] if header else []) + rows
    widths = [max(len(line[c]) for line in lines) for c in range(len(head))] if lines else []
    return "".join(
        "   ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() + "\n"
        for line in lines
    )


def _time(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    moment = datetime.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")


def document(node: str, r: resource_pb2.Resource) -> dict[str, Any]:
    """One resource as talosctl prints it: node, metadata, spec."""
    md = r.metadata
    meta: dict[str, Any] = {
        "namespace": md.namespace,
        "type": md.type,
        "id": md.id,
        "version": int(md.version) if md.version.isdigit() else md.version,
        "owner": md.owner,
        "phase": md.phase,
        "created": _time(md.created),
        "updated": _time(md.updated),
    }
    if md.labels:
        meta["labels"] = dict(md.labels)
    if md.annotations:
        meta["annotations"] = dict(md.annotations)
    return {"node": node, "metadata": meta, "spec": spec_dict(r)}


def yaml_documents(node: str, resources: Sequence[resource_pb2.Resource]) -> str:
    return "".join(
        "---\n" + yaml.safe_dump(document(node, r), sort_keys=False, indent=4, width=1 << 16)
        for r in resources
    )


def json_documents(node: str, resources: Sequence[resource_pb2.Resource]) -> str:
    return "".join(json.dumps(document(node, r), indent=4) + "\n" for r in resources)
