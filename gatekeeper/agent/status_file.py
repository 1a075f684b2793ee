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


def status_document(status: Status, **extra: Any) -> dict[str, Any]:
    doc = asdict(status)
    doc["state"] = status.state.value
    doc["endpoints"] = list(status.endpoints)
    doc.update(extra)
    return doc


def write_status(run_dir: Path, doc: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
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
