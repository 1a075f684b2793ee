"""Run every benchmark and print one table of their verdicts (`make bench`).

Each bench/bench_*.py runs as its own process (root; each builds and removes its own lab) with
sizes that keep the whole run near 20 minutes on a 2-core machine; `--full` uses each
benchmark's own defaults instead. A benchmark's verdicts are the `BENCH-VERDICTS` records it
prints (bench/verdict.py); one that prints none, crashes or times out is a failed row, never a
silent gap. Exit status 0 only when no verdict missed and every benchmark gave one.

    python bench/run_all.py [--full] [--skip vm --skip scale_vm] [--only firewall] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from verdict import parse

BENCH_DIR = Path(__file__).resolve().parent

# Arguments for the quick run (the default). Names are the part after "bench_".
QUICK_ARGS: dict[str, list[str]] = {
    "firewall": [],
    "maintenance": ["--events", "100", "--moves", "10"],
    "link": ["--runs", "3", "--provisions", "100"],
    "recovery": ["--runs", "3"],
    "tunnel": ["--seconds", "3", "--pings", "100"],
    "storm": ["--count", "1000"],  # the target's own size: 1000 machines
    # The target names 10,000 peers; idle is measured after the join window
    # (gatekeeper/server/endpoint_sync.py, JOIN_WINDOW).
    "scale": ["--count", "10000", "--idle", "20", "--settle", "40"],
    "vm": ["--boots", "3"],
    # The same 10,000 on kernel WireGuard in the QEMU guest (TCG: the fill takes minutes).
    "scale_vm": ["--count", "10000", "--idle", "20", "--settle", "40"],
    "agent_rss": [],
}
TIMEOUT_S = 900


@dataclass(frozen=True)
class Row:
    bench: str
    measure: str
    target: str
    value: str
    verdict: str

    @property
    def failed(self) -> bool:
        return self.verdict in ("MISSED", "no verdict")


def discover() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def _shown(value: object, unit: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.4g} {unit}".strip()


def run_one(name: str, extra: list[str]) -> tuple[list[Row], float]:
    argv = [sys.executable, str(BENCH_DIR / f"bench_{name}.py"), *extra]
    print(f"== {name}: {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=TIMEOUT_S)
        stdout, why = done.stdout, f"exit status {done.returncode}"
        tail = done.stderr.strip().splitlines()[-1:] if done.returncode else []
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout
        stdout = out.decode(errors="replace") if isinstance(out, bytes) else (out or "")
        why, tail = f"timed out after {TIMEOUT_S} s", []
    elapsed = time.monotonic() - started
    print(stdout, end="" if stdout.endswith("\n") or not stdout else "\n", flush=True)
    rows = []
    for record in parse(stdout):
        verdicts = record.get("verdicts")
        for v in verdicts if isinstance(verdicts, list) else []:
            ok = v.get("ok")
            mark = {True: "ok", False: "MISSED", None: "-"}.get(ok, "-")
            rows.append(
                Row(
                    str(record.get("bench", name)),
                    str(v.get("measure", "")),
                    str(v.get("target", "")) or "-",
                    _shown(v.get("value"), v.get("unit", "")),
                    mark,
                )
            )
    if not rows:
        note = why + (f": {tail[0]}" if tail else "")
        rows.append(Row(name, f"({note})", "-", "-", "no verdict"))
    return rows, elapsed


HEADER = ("bench", "measure", "target", "value", "verdict")


def text_table(rows: list[Row]) -> str:
    cells = [HEADER, *((r.bench, r.measure, r.target, r.value, r.verdict) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(HEADER))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row], title: str) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [title, "", "| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += [
        "| " + " | ".join(esc(c) for c in (r.bench, r.measure, r.target, r.value, r.verdict)) + " |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="each benchmark's default sizes")
    parser.add_argument("--skip", action="append", default=[], help="a bench to leave out")
    parser.add_argument("--only", action="append", default=[], help="run just these benches")
    parser.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    args = parser.parse_args()
    names = discover()
    unknown = sorted(set(args.skip + args.only) - set(names))
    if unknown:
        parser.error(f"no such benchmark: {', '.join(unknown)} (have: {', '.join(names)})")
    chosen = [n for n in names if n not in args.skip and (not args.only or n in args.only)]
    rows: list[Row] = []
    timings = []
    for name in chosen:
        extra = [] if args.full else QUICK_ARGS.get(name, [])
        got, elapsed = run_one(name, extra)
        rows += got
        timings.append(f"{name} {elapsed:.0f} s")
    print()
    print(text_table(rows))
    print(f"\nran: {', '.join(timings)}; skipped: {', '.join(args.skip) or 'none'}")
    if args.markdown is not None:
        title = (
            f"Benchmarks, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
            f"({'full' if args.full else 'quick'} sizes; skipped: {', '.join(args.skip) or 'none'})"
        )
        args.markdown.write_text(markdown_table(rows, title))
        print(f"Markdown table written to {args.markdown}")
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
