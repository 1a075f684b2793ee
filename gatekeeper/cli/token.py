"""`gatekeeper token create|list|revoke`: join tokens with a lifecycle.

These commands open the server's registry directly (SQLite is safe across processes, and a
PostgreSQL `--registry URL` across servers), so they work before the server's first start and
while it runs; a revocation applies to the server's (every server's) very next Provision.
The token is printed once, on stdout, and never stored: only its hash.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gatekeeper.cli.fleetstate import CliError, add_state_dir, fail, open_registry_for
from gatekeeper.server.audit import AUDIT_NAME, AuditLog, local_user, rfc3339
from gatekeeper.server.escape import shown
from gatekeeper.server.registry import RegistryError
from gatekeeper.server.tokens import TokenRecord, new_token, parse_duration


def duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def uses_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("--max-uses must be at least 1")
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = subparsers.add_parser(
        "token",
        help="create, list and revoke join tokens",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")

    create = sub.add_parser("create", help="create a token and print it (shown once)")
    create.add_argument("--name", default="", help="a label to recognise the token by")
    create.add_argument(
        "--expires-in",
        type=duration_arg,
        metavar="DURATION",
        help="no new machines after this long (seconds, or 90m, 12h, 7d)",
    )
    create.add_argument(
        "--max-uses", type=uses_arg, metavar="N", help="at most N new machines may join with it"
    )
    add_state_dir(create, registry=True)
    create.set_defaults(func=cmd_create)

    listing = sub.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    add_state_dir(listing, registry=True)
    listing.set_defaults(func=cmd_list)

    revoke = sub.add_parser("revoke", help="revoke a token: no machine may provision with it")
    revoke.add_argument("token_id", metavar="ID", help="the token's id (see token list)")
    add_state_dir(revoke, registry=True)
    revoke.set_defaults(func=cmd_revoke)


def _audit_or_warn(
    state_dir: str, command: str, action: str, now: float, **fields: str | int | None
) -> None:
    try:
        AuditLog(Path(state_dir) / AUDIT_NAME).write(now, action, "ok", who=local_user(), **fields)
    except OSError as exc:
        print(
            f"gatekeeper {command}: done, but its audit line was not written: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )


def create_token(
    args: argparse.Namespace, *, name: str, expires_in: float | None, max_uses: int | None
) -> tuple[str, TokenRecord]:
    """A new token stored (hashed) and audited: its text to show once, and its record.

    `args` names the registry (--state-dir, and --registry where the command has it)."""
    state_dir = args.state_dir
    now = time.time()
    try:
        text, record = new_token(name=name, now=now, expires_in=expires_in, max_uses=max_uses)
        registry = open_registry_for(args, create=True)
        with registry:
            registry.add_token(record)
    except (ValueError, RegistryError) as exc:
        raise CliError(str(exc)) from None
    # Stored: the token works from now on, whether or not its audit line can be written.
    _audit_or_warn(
        state_dir,
        "token create",
        "token.create",
        now,
        token=record.label,
        expires=rfc3339(record.expires) if record.expires else None,
        max_uses=record.max_uses,
    )
    return text, record


def cmd_create(args: argparse.Namespace) -> int:
    try:
        text, record = create_token(
            args, name=args.name, expires_in=args.expires_in, max_uses=args.max_uses
        )
    except CliError as exc:
        return fail("token create", str(exc))
    print(text)
    print(
        f"token {record.token_id} created; it is shown only now: put it in siderolink.api= "
        "as ?jointoken=...",
        file=sys.stderr,
    )
    return 0


def token_row(record: TokenRecord, now: float) -> dict[str, object]:
    return {
        "id": record.token_id,
        "name": record.name,
        "state": record.state(now).value,
        "uses": record.uses,
        "max_uses": record.max_uses,
        "expires": rfc3339(record.expires) if record.expires else None,
        "created": rfc3339(record.created),
        "revoked": rfc3339(record.revoked) if record.revoked else None,
    }


def cmd_list(args: argparse.Namespace) -> int:
    try:
        registry = open_registry_for(args, readonly=True)
        with registry:
            tokens = registry.tokens()
    except (CliError, RegistryError) as exc:
        return fail("token list", str(exc))
    now = time.time()
    rows = [token_row(t, now) for t in tokens]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("ID", "NAME", "STATE", "USES", "EXPIRES", "CREATED")
    table = [
        (
            str(r["id"]),
            str(r["name"]) or "-",
            str(r["state"]),
            f"{r['uses']}/{r['max_uses']}" if r["max_uses"] else str(r["uses"]),
            str(r["expires"] or "never"),
            str(r["created"]),
        )
        for r in rows
    ]
    print_table(header, table)
    return 0


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    for row in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_revoke(args: argparse.Namespace) -> int:
    now = time.time()
    # A whole token pasted here works too; only its id part is used (and ever printed).
    token_id = args.token_id.strip().partition(".")[0][:64]
    try:
        registry = open_registry_for(args)
        with registry:
            known = registry.token(token_id)
            done = registry.revoke_token(token_id, now)
    except (CliError, RegistryError) as exc:
        return fail("token revoke", str(exc))
    if known is None:
        return fail("token revoke", f"no token with id '{shown(token_id, 64)}' (see token list)")
    if not done:
        print(f"token {token_id} was already revoked", file=sys.stderr)
        return 0
    _audit_or_warn(args.state_dir, "token revoke", "token.revoke", now, token=known.label)
    print(f"token {known.label} revoked")
    return 0
