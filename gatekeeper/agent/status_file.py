"""The agent's published status: a JSON file replaced atomically, read by `gatekeeper status`."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gatekeeper.link.lifecycle import Status

DEFAULT_RUN_DIR = Path("/run/gatekeeper")
STATUS_NAME = "status.json"


# The last path changes `gatekeeper status` shows, oldest first.
PATH_HISTORY = 10
# A change of these makes an entry; the reason goes along with it.
_PATH_FIELDS = ("connected", "path", "endpoint")


def status_document(status: Status, **extra: Any) -> dict[str, Any]:
    doc = asdict(status)
    doc["state"] = status.state.value
    doc["endpoints"] = list(status.endpoints)
    # Defaults for what the agent may not pass: None means "not reported".
    doc["maintenance_port"] = None
    doc.update(extra)
    return doc


def with_path_history(doc: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """`doc` with `path_history`: the previous document's, plus an entry when the link's
    path (connected, UDP or tunnel, endpoint) differs from the previous document's."""
    history = list((previous or {}).get("path_history") or [])[-PATH_HISTORY:]
    now = {k: doc.get(k) for k in _PATH_FIELDS}
    before = {k: (previous or {}).get(k) for k in _PATH_FIELDS}
    if previous is None or now != before:
        history.append({"at": doc.get("updated"), **now, "path_reason": doc.get("path_reason")})
    return {**doc, "path_history": history[-PATH_HISTORY:]}


def _previous(run_dir: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((run_dir / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def write_status(run_dir: Path, doc: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    # The history lives in the file itself, so it survives an agent restart and needs no
    # state in the writer.
    doc = with_path_history(doc, _previous(run_dir))
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".status.")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, run_dir / STATUS_NAME)


def read_status(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATUS_NAME
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no agent status at {path}: is `gatekeeper agent` running with --run-dir {run_dir}?"
        ) from None
    return doc
