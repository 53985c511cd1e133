"""A job that cannot run as specified fails before anything else is decided (refused, not retried).

`invalid`: spec errors the reconciler found (jobspec.check, the rendered trainer config); `conflict`: an
object under one of the job's child names that the job did not create (policies.children).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf_operator.planning import Pass, Plan


def apply(ps: Pass) -> Plan | None:
    if ps.invalid:
        return ps.fail("InvalidSpec", ps.invalid)
    if ps.observed and ps.observed.conflict:
        return ps.fail("ChildNameConflict", ps.observed.conflict)
    return None
