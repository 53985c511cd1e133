"""Pure functions that turn job objects and trainer logs into the live table, the summary and the chart."""

from __future__ import annotations

import json
from typing import Any

KEY_METRIC = {"SFTJob": ("loss", "loss"), "RewardModelJob": ("accuracy", "acc"), "PPOJob": ("reward", "reward")}


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
    waiting = next(
        (c.get("message", "") for c in st.get("conditions", []) if c.get("status") == "True" and c["type"] in ("WaitingForDependencies", "Failed")),
        "",
    )
    return [
        f"{kind}/{name}",
        st.get("phase") or "Pending",
        f"{fmt(step)}/{fmt(total)}" if step is not None else "-",
        f"{label}={fmt(metric)}" if metric is not None else "-",
        waiting[:70],
    ]


def table(objs: list[dict]) -> str:
    rows = [["JOB", "PHASE", "STEP", "METRIC", "NOTE"]] + [job_row(o) for o in objs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


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


def first_last(series: list[dict], key: str) -> tuple[float | None, float | None]:
    vals = [r[key] for r in series if isinstance(r.get(key), (int, float))]
    return (vals[0], vals[-1]) if vals else (None, None)


# Which curves to draw per kind: (JSON key, label).
CURVES = {
    "SFTJob": [("rlhf_trainer_loss", "SFT loss")],
    "RewardModelJob": [("rlhf_trainer_loss", "RM loss"), ("rlhf_reward_accuracy", "RM train accuracy"),
                       ("rlhf_reward_eval_accuracy", "RM eval accuracy")],
    "PPOJob": [("rlhf_ppo_reward_mean", "PPO reward mean"), ("rlhf_ppo_kl", "PPO KL")],
}


def plot_curves(series: dict[str, list[dict]], kinds: dict[str, str], path) -> None:
    """One panel per job with its stage's curves; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in series if kinds.get(n) in CURVES]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5 * max(len(names), 1), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        for key, label in CURVES[kinds[name]]:
            pts = [(r["step"], r[key]) for r in series[name] if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=label, marker="." if len(pts) < 30 else None)
        ax.set_title(f"{kinds[name]}/{name}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
