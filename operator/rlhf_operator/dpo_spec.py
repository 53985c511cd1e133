"""DPOJob specifics: the rules across fields that the schema carries as CEL rules, checked again here for
jobs stored under an older CRD or an API server without CEL (the webhook and the reconciler give the same
answer), and the rendering of the spec into the trainer's ``dpo`` section.

Pure functions. ``jobspec.validate`` calls :func:`errors`; the trainer's parser checks the same rules again
(``rlhf_trainer.config.validate_dpo``).
"""

from __future__ import annotations

from typing import Any

from rlhf_operator.crd_schema import DPO_PAIR_FORMATS


def _scorer(online: dict[str, Any]) -> tuple[bool, bool]:
    return isinstance(online.get("rewardModel"), dict), bool(online.get("rewardFn"))


def errors(spec: dict[str, Any]) -> list[str]:
    out: list[str] = []
    dpo = spec.get("dpo") or {}
    online = spec.get("online")
    loss = dpo.get("loss", "sigmoid")
    if dpo.get("labelSmoothing") and loss != "sigmoid":
        out.append(f"spec.dpo.labelSmoothing: only the sigmoid loss has label smoothing, the loss is {loss}; set "
                   "labelSmoothing to 0 or loss to sigmoid")
    if not isinstance(online, dict):
        if dpo.get("referenceMode") == "each_round":
            out.append("spec.dpo.referenceMode: each_round needs online rounds (spec.online); use initial for "
                       "offline DPO")
        fmt = (spec.get("dataset") or {}).get("format")
        if fmt is not None and fmt not in DPO_PAIR_FORMATS:
            out.append(f"spec.dataset.format: offline DPO trains on preference pairs, not {fmt} rows; use one of "
                       f"{', '.join(DPO_PAIR_FORMATS)}, or set spec.online to sample pairs from prompts")
        return out
    rounds = online.get("rounds")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        out.append(f"spec.online.rounds: got {rounds!r}; 0 rounds is offline DPO: remove spec.online to train "
                   "offline on the preference pairs of spec.dataset, or set rounds >= 1")
    else:
        steps = (spec.get("training") or {}).get("maxSteps")
        if isinstance(steps, int) and steps % rounds:
            out.append(f"spec.training.maxSteps: online DPO runs maxSteps / rounds steps per round, and {steps} is "
                       f"not a multiple of spec.online.rounds ({rounds}); use a multiple, or 0 to size each round by "
                       "spec.online.epochsPerRound")
    if (spec.get("dataset") or {}).get("format") == "text":
        out.append("spec.dataset.format: online DPO samples answers to prompts, and text rows have none; use prompt, "
                   "prompt_response or a preference-pair format")
    model, fn = _scorer(online)
    if not (model or fn):
        out.append("spec.online.rewardModel: online DPO scores its samples with a reward model; set rewardModel (e.g. "
                   "fromJob a RewardModelJob) or rewardFn, or remove spec.online for offline DPO on preference pairs")
    elif model and fn:
        out.append("spec.online.rewardFn: set either rewardFn or rewardModel, not both")
    k = online.get("samplesPerPrompt")
    if isinstance(k, int) and k < 2:
        out.append(f"spec.online.samplesPerPrompt: a pair needs a best and a worst response, so at least 2 per "
                   f"prompt, got {k}; set samplesPerPrompt >= 2 (e.g. 8)")
    return out
