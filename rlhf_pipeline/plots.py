"""training_curves.png: one panel per stage, raw points with a smoothed line beside them.

PPO: the reward's first- and last-quarter means drawn as bands (mean +- spread) so the rise can be judged
against the noise, and the KL on its own right-hand axis. Reward model: loss on the left axis, train and
held-out accuracy (with its standard error) on the right. DPO: the implicit-reward accuracy on the left, and
online each round's best-of-n and worst-of-n reward as steps over the round's span on the right.
"""

from __future__ import annotations

from rlhf_trainer import contract as c

from . import stats, summary

RAW = {"s": 10, "alpha": 0.35}


def _points(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def _raw_and_smooth(ax, xs, ys, color: str, label: str) -> None:
    if not xs:
        return
    ax.scatter(xs, ys, color=color, **RAW)
    ax.plot(xs, stats.smooth(ys), color=color, label=f"{label} (smoothed)")


def _quarter_bands(ax, xs, ys, color: str) -> str:
    q = stats.quarters(ys)
    if not q:
        return ""
    k = q["first"]["n"]
    for part, span in ((q["first"], xs[:k]), (q["last"], xs[-k:])):
        lo, hi = part["mean"] - part["sd"], part["mean"] + part["sd"]
        ax.fill_between([span[0], span[-1]], lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.hlines(part["mean"], span[0], span[-1], colors=color, linestyles="--", linewidth=1.5,
                  label="quarter mean ± spread" if part is q["first"] else None)
    return (f"reward, first quarter {q['first']['mean']:.2f} ± {q['first']['sd']:.2f} → "
            f"last quarter {q['last']['mean']:.2f} ± {q['last']['sd']:.2f}")


def _ppo(ax, rows: list[dict]) -> str:
    xs, ys = _points(rows, c.M_PPO_REWARD_MEAN)
    _raw_and_smooth(ax, xs, ys, "tab:blue", "reward mean")
    note = _quarter_bands(ax, xs, ys, "tab:blue")
    ax.set_ylabel("reward (normalised RM score)", color="tab:blue")
    kx, ky = _points(rows, c.M_PPO_KL)
    if kx:
        kl_ax = ax.twinx()
        _raw_and_smooth(kl_ax, kx, ky, "tab:red", "KL")
        kl_ax.set_ylabel("KL to the SFT policy", color="tab:red")
        kl_ax.legend(fontsize=7, loc="lower right")
    return note


def _reward_model(ax, rows: list[dict], eval_se: float | None) -> str:
    xs, ys = _points(rows, c.M_LOSS)
    _raw_and_smooth(ax, xs, ys, "tab:gray", "loss")
    ax.set_ylabel("pairwise loss")
    acc_ax = ax.twinx()
    ax_, ay = _points(rows, c.M_RM_ACCURACY)
    _raw_and_smooth(acc_ax, ax_, ay, "tab:green", "train accuracy")
    ex, ey = _points(rows, c.M_RM_EVAL_ACCURACY)
    note = ""
    if ex:
        acc_ax.errorbar(ex, ey, yerr=eval_se, fmt="o", color="tab:purple", capsize=3, label="held-out accuracy ± s.e.")
        note = f"held-out accuracy {ey[-1]:.3f}" + (f" ± {eval_se:.3f}" if eval_se else "")
    acc_ax.set_ylim(0.3, 1.0)
    acc_ax.axhline(0.5, color="black", linewidth=0.6, linestyle=":")
    acc_ax.set_ylabel("accuracy")
    acc_ax.legend(fontsize=7, loc="lower right")
    return note


def _dpo(ax, rows: list[dict]) -> str:
    xs, ys = _points(rows, c.M_DPO_REWARD_ACCURACY)
    _raw_and_smooth(ax, xs, ys, "tab:green", "implicit-reward accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.axhline(0.5, color="black", linewidth=0.6, linestyle=":")
    ax.set_ylabel("implicit-reward accuracy", color="tab:green")
    rounds = summary.dpo_rounds(rows)
    if not rounds:
        return f"accuracy {ys[-1]:.2f}" if ys else ""
    rew_ax = ax.twinx()
    for r in rounds:
        span = [row["step"] for row in rows if row.get(c.M_DPO_ROUND) == r["round"]]
        for key, color, label in (("best_reward_mean", "tab:blue", "best of n"),
                                  ("worst_reward_mean", "tab:red", "worst of n")):
            if r[key] is not None:
                rew_ax.hlines(r[key], min(span), max(span), colors=color, linewidth=2,
                              label=label if r is rounds[0] else None)
        rew_ax.axvline(min(span), color="gray", linewidth=0.5, linestyle="--")
    rew_ax.set_ylabel("reward of the round's samples")
    rew_ax.legend(fontsize=7, loc="lower right")
    best = [r["best_reward_mean"] for r in rounds if r["best_reward_mean"] is not None]
    return "best-of-n reward by round " + " → ".join(f"{b:.2f}" for b in best) if best else ""


def _sft(ax, rows: list[dict]) -> str:
    xs, ys = _points(rows, c.M_LOSS)
    _raw_and_smooth(ax, xs, ys, "tab:gray", "train loss")
    ex, ey = _points(rows, "eval_loss")
    if ex:
        ax.scatter(ex, ey, color="tab:orange", marker="D", label="held-out loss", zorder=3)
    ax.set_ylabel("token cross-entropy")
    return f"held-out loss {ey[-1]:.2f}" if ex else ""


def plot_curves(series: dict[str, list[dict]], kinds: dict[str, str], path, eval_se: float | None = None) -> None:
    """One panel per job, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in series if kinds.get(n) in ("SFTJob", "RewardModelJob", "PPOJob", "DPOJob")]
    cols = max(len(names), 1)
    fig, axes = plt.subplots(1, cols, figsize=(5.5 * cols, 4.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        kind, rows = kinds[name], series[name]
        if kind == "PPOJob":
            note = _ppo(ax, rows)
        elif kind == "DPOJob":
            note = _dpo(ax, rows)
        elif kind == "RewardModelJob":
            note = _reward_model(ax, rows, eval_se)
        else:
            note = _sft(ax, rows)
        ax.set_title(f"{kind}/{name}" + (f"\n{note}" if note else ""), fontsize=9)
        ax.set_xlabel("PPO iteration" if kind == "PPOJob" else "optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
