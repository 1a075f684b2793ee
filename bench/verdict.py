"""The one way a benchmark states a verdict, so that `make bench` can print one table.

A benchmark measures the whole path its target names and reports that figure, not a friendlier
neighbour: `Verdict("firewall: 1000 documents parsed+rendered+applied", "<= 0.5 s", 0.42, "s",
ok=0.42 <= 0.5)`. It prints its own human-readable lines as it likes, then calls `emit()` once;
`emit()` writes one line `BENCH-VERDICTS <json>` to stdout, which `bench/run_all.py` collects.
A figure that has no target (a baseline, a floor) is a Verdict with `target=""` and `ok=None`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

MARKER = "BENCH-VERDICTS "


@dataclass(frozen=True)
class Verdict:
    measure: str
    target: str
    value: float | None
    unit: str = ""
    ok: bool | None = None
    note: str = ""

    def line(self) -> str:
        shown = "-" if self.value is None else f"{self.value:.4g}"
        mark = {True: "ok", False: "MISSED", None: ""}[self.ok]
        tail = f" ({self.note})" if self.note else ""
        return f"{self.measure}: {shown} {self.unit} target {self.target or '-'} {mark}{tail}"


def emit(bench: str, verdicts: list[Verdict]) -> bool:
    """Print the verdict lines and the machine-readable marker; True when none missed."""
    for v in verdicts:
        print(v.line())
    record = {"bench": bench, "verdicts": [asdict(v) for v in verdicts]}
    print(MARKER + json.dumps(record), flush=True)
    sys.stdout.flush()
    return all(v.ok is not False for v in verdicts)


def parse(stdout: str) -> list[dict[str, object]]:
    """The records a benchmark run emitted (several when it emitted more than once)."""
    out = []
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            out.append(json.loads(line[len(MARKER) :]))
    return out
