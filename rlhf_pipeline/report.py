"""Pure functions for the live table and for reading the trainers' metric logs."""

from __future__ import annotations

import json
import textwrap
from typing import Any

KEY_METRIC = {"SFTJob": ("loss", "loss"), "RewardModelJob": ("accuracy", "acc"), "PPOJob": ("reward", "reward"),
              "DPOJob": ("rewardAccuracy", "acc")}


def fmt(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def job_row(obj: dict) -> list[str]:
    kind, name = obj.get("kind", "?"), obj["metadata"]["name"]
    st = obj.get("status") or {}
    prog = st.get("progress") or {}
    step, total = prog.get("step"), prog.get("totalSteps")
    key, label = KEY_METRIC.get(kind, ("loss", "loss"))
    metric = prog.get(key)
    note = next(
        (c.get("message", "") for c in st.get("conditions", [])
         if c.get("status") == "True" and c["type"] in ("WaitingForDependencies", "Failed")),
        "",
    )
    return [
        f"{kind}/{name}",
        st.get("phase") or "Pending",
        prog.get("summary") or (f"{fmt(step)}/{fmt(total)}" if step is not None else "-"),  # DPO: with the round
        f"{label}={fmt(metric)}" if metric is not None else "-",
        " ".join(note.split()),
    ]


def table(objs: list[dict], width: int = 100) -> str:
    """The live table in `width` columns: the NOTE column wraps at word boundaries onto indented lines."""
    rows = [["JOB", "PHASE", "STEP", "METRIC", "NOTE"]] + [job_row(o) for o in objs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    indent = sum(widths) + 2 * len(widths)
    room = max(width - indent, 20)
    lines = []
    for r in rows:
        head = "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  "
        note = textwrap.wrap(r[-1], room, break_long_words=False, break_on_hyphens=False) or [""]
        lines.append((head + note[0]).rstrip())
        lines += [" " * indent + more for more in note[1:]]
    return "\n".join(lines)


def parse_log_metrics(log_text: str) -> list[dict]:
    """The trainer prints one JSON object per logged step; other lines are ignored."""
    out = []
    for line in log_text.splitlines():
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out
