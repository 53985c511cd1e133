"""Where a trainer pod really started: reported by the trainer, never assumed by the operator.

The trainer exports the checkpoint step it restored (status.progress.resumedFromStep; -1 when it
started fresh). The key is cleared whenever a new pod starts, and the first report of the new pod
becomes one event: "resumed from step N" or "started from step 0 (no checkpoint)".
"""

from __future__ import annotations

from typing import Any

KEY = "resumedFromStep"


def event(before: dict[str, Any] | None, after: dict[str, Any] | None, pod: str) -> tuple[str, str, str] | None:
    """(type, reason, message) when `after` (progress now) carries a report `before` lacked."""
    step = (after or {}).get(KEY)
    if step is None or (before or {}).get(KEY) is not None:
        return None
    who = f"trainer pod {pod}" if pod else "the trainer"
    if step < 0:
        return ("Normal", "StartedFresh", f"{who} started from step 0 (no checkpoint to resume from)")
    return ("Normal", "ResumedFromCheckpoint", f"{who} resumed from step {step} (checkpoint restored)")
