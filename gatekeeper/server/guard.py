"""Around every Provision: the per-source failure limit, the audit line and the metrics.

The provisioner decides; this layer only watches its decisions. It holds no gRPC either:
`service.py` hands it `ProvisionInput` (with the caller's address) and maps `Rejected`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from gatekeeper.server.audit import AuditLog
from gatekeeper.server.metrics import ServerMetrics
from gatekeeper.server.provisioning import (
    Code,
    Provisioner,
    ProvisionInput,
    ProvisionOutput,
    Rejected,
)
from gatekeeper.server.ratelimit import FailureLimiter, clean_peer, source_of
from gatekeeper.server.tokens import TokenDenied

log = logging.getLogger(__name__)

_OUTCOME = {
    Code.PERMISSION_DENIED: "denied",
    Code.INVALID_ARGUMENT: "invalid",
    Code.RESOURCE_EXHAUSTED: "exhausted",
    Code.ALREADY_EXISTS: "conflict",
    Code.INTERNAL: "error",
}
# Failures a legitimate machine does not produce in bulk: they spend the source's budget.
_COUNTED = (Code.PERMISSION_DENIED, Code.INVALID_ARGUMENT)
RATE_LIMITED = "too many failed provisions from this address; retry later"


class ProvisionGuard:
    def __init__(
        self,
        provisioner: Provisioner,
        *,
        audit: AuditLog | None = None,
        metrics: ServerMetrics | None = None,
        limiter: FailureLimiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.provisioner = provisioner
        self.audit = audit
        self.metrics = metrics
        self.limiter = limiter or FailureLimiter()
        self.clock = clock
        # When a provision last succeeded (monotonic): the server reads its device for new
        # endpoints while machines are joining, not on an idle timer.
        self.last_ok = time.monotonic()
        # Sources already told about being limited: one audit line per episode, not per call.
        self._limited_noted: set[str] = set()

    def provision_batch(
        self, reqs: Sequence[ProvisionInput]
    ) -> list[ProvisionOutput | BaseException]:
        """Provisioner.provision_batch, with each request limited, counted and audited as if
        it had come alone."""
        lines: list[bytes] = []  # the batch's audit lines, written at once
        try:
            results: list[ProvisionOutput | BaseException | None] = [
                self._limited(req, lines) for req in reqs
            ]
            admitted = [i for i, r in enumerate(results) if r is None]
            outcomes = self.provisioner.provision_batch([reqs[i] for i in admitted])
            for i, out in zip(admitted, outcomes, strict=True):
                results[i] = out
                self._watch(reqs[i], out, lines)
        finally:
            self._write_audit(lines)
        return [r if r is not None else Rejected(Code.INTERNAL, "not decided") for r in results]

    def _limited(self, req: ProvisionInput, lines: list[bytes]) -> Rejected | None:
        source = source_of(req.peer)
        blocked = self.limiter.blocked(source)
        if blocked and not self._valid_token(req):
            self._count("rate_limited")
            if source not in self._limited_noted and len(self._limited_noted) < 10_000:
                self._limited_noted.add(source)
                self._audit(lines, req, "rate_limited", reason=RATE_LIMITED)
                log.warning("provisions from %s are rate limited", source)
            return Rejected(Code.RESOURCE_EXHAUSTED, RATE_LIMITED)
        if not blocked:
            self._limited_noted.discard(source)
        return None

    def _watch(
        self, req: ProvisionInput, out: ProvisionOutput | BaseException, lines: list[bytes]
    ) -> None:
        if isinstance(out, Rejected):
            if out.code in _COUNTED:
                self.limiter.failure(source_of(req.peer))
            outcome = _OUTCOME.get(out.code, "error")
            self._count(outcome)
            self._audit(lines, req, outcome, reason=out.message, **out.audit)
        elif isinstance(out, BaseException):
            self._count("error")
            self._audit(lines, req, "error", reason="internal error")
        else:
            self.last_ok = time.monotonic()
            self._count("ok")
            self._audit(lines, req, "ok", address=out.node_address_prefix.split("/")[0])

    def _valid_token(self, req: ProvisionInput) -> bool:
        """A token that admits someone passes a limited source: the limit counts other
        people's failures, and a machine sharing the attacker's /64 (or NAT) must not pay for
        them. The check is one constant-time compare or one hash and one keyed lookup. An
        open server has no token to tell machines from the flood: its limit applies to all.
        """
        tokens = self.provisioner.tokens
        try:
            tokens.admit(req.join_token)
        except TokenDenied:
            return False
        return not tokens.open()

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.provisions.labels(outcome).inc()

    def _audit(self, lines: list[bytes], req: ProvisionInput, outcome: str, **fields: str) -> None:
        """A line for the batch's one write (`_write_audit`)."""
        if self.audit is None:
            return
        lines.append(
            self.audit.line(
                self.clock(),
                "provision",
                outcome,
                **{"from": clean_peer(req.peer)},
                node_uuid=req.node_uuid.strip()[:128] or None,
                token=self.provisioner.tokens.describe(req.join_token),
                **fields,
            )
        )

    def _write_audit(self, lines: list[bytes]) -> None:
        if self.audit is None or not lines:
            return
        try:
            self.audit.append(lines)
        except OSError as exc:
            # Losing audit lines must not take provisioning down with them.
            log.error("cannot write the audit log (%d lines lost): %s", len(lines), exc)
