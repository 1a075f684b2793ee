"""The two ways a VM run ends early: skipped (cannot run here) or failed (ran, went wrong)."""

from __future__ import annotations


class Skip(Exception):
    """This host cannot run the VM tests; the message says why in one line and what to do."""


class VmFailure(Exception):
    """The VM ran and a check failed (or it did not boot); the message carries the evidence."""
