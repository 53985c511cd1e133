"""Command line: ``python -m rlhf_trainer {sft,reward,ppo,dpo} --config FILE`` (or ``$RLHF_CONFIG``).

Exit codes (``contract``): 0 done, 2 bad config, 3 bad data, 4 unreadable model, 5 NaN/Inf loss,
7 a checkpoint changed after it was written, 8 the reward endpoint kept failing (retried), 9 the reward
endpoint refused the request (permanent), 143 stopped by SIGTERM after writing a checkpoint. The
reason of a failure is printed and also written to the container's termination message
(``$RLHF_TERMINATION_LOG``) with a last line ``[exit N, rank R]`` (runtime.failure), so the operator sees the
trainer's code also when torchrun ends the container with its own; a success message carries the final progress
(incl. ``resumedFromStep``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys

from . import contract
from .config import CONFIG_FILE_NAME, CONFIG_MOUNT_DIR, STAGES, ConfigError, TrainerConfig, load_config
from .runtime.failure import Preempted, TrainerError, fail, record_failure, write_termination_message

# Stage -> module with run(cfg); imported lazily so that `--help` and config errors need no torch.
STAGE_MODULES = {"sft": "rlhf_trainer.sft", "reward": "rlhf_trainer.reward", "ppo": "rlhf_trainer.ppo",
                 "dpo": "rlhf_trainer.dpo"}


_KIND = {"DataError": "data error", "ModelError": "model error", "NumericError": "numeric error",
         "CheckpointError": "checkpoint error", "NonFiniteGradients": "non-finite gradients",
         "RewardEndpointError": "reward endpoint error"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rlhf_trainer", description="RLHF trainer: SFT, reward model, PPO, DPO.")
    p.add_argument("stage", choices=STAGES, help="training stage to run")
    p.add_argument(
        "--config",
        default=os.environ.get(contract.ENV_CONFIG) or f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}",
        help=f"trainer config (YAML/JSON); default ${contract.ENV_CONFIG} or {CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}",
    )
    return p.parse_args(argv)


def run_stage(cfg: TrainerConfig) -> dict:
    from .runtime import threads

    print(f"rlhf-trainer: {threads.apply(cfg.training.threads)}", file=sys.stderr, flush=True)
    return importlib.import_module(STAGE_MODULES[cfg.stage]).run(cfg)


def latest_checkpoint_step(cfg: TrainerConfig) -> int | None:
    from .runtime.checkpoint import CheckpointManager

    done = CheckpointManager.from_config(cfg).complete_checkpoints()
    return int(done[-1].name.split("-", 1)[1]) if done else None


def final_metrics_message(result: dict, checkpoint_step: int | None = None) -> str:
    """The termination message of a successful run: its final metrics as JSON keyed by contract names.

    The operator reads it for the job's final progress, so a finished job shows its last step even when
    the run ended between two scrapes of the metrics endpoint.
    """
    values = {k: v for k, v in (result.get("metrics") or {}).items()
              if k.startswith("rlhf_") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    step = result.get("step")
    if isinstance(step, int):
        values[contract.M_STEP] = step
        values[contract.M_TOTAL_STEPS] = step
    if checkpoint_step is not None:
        values[contract.M_LAST_CHECKPOINT_STEP] = checkpoint_step
    resumed = result.get("resumed_from")
    if isinstance(resumed, int) and not isinstance(resumed, bool):
        values[contract.M_RESUMED_FROM_STEP] = resumed
    return json.dumps(values, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, stage=args.stage)
        result = run_stage(cfg)
    except ConfigError as e:
        fail(contract.EXIT_CONFIG_ERROR, f"config error: {e}")
    except Preempted as e:
        fail(e.exit_code, f"preempted: {e}")
    except TrainerError as e:
        fail(e.exit_code, f"{_KIND.get(type(e).__name__, 'error')}: {e}")
    except Exception as e:  # a bug or an environment problem: keep the traceback, record the reason
        record_failure(1, f"unexpected error: {type(e).__name__}: {e}")  # Python exits 1 on an uncaught error
        raise
    final = (result or {}).get("final_dir")
    if int(os.environ.get("RANK", "0")) == 0:
        write_termination_message(final_metrics_message(result or {}, latest_checkpoint_step(cfg)))
        print(f"rlhf-trainer: {args.stage} done" + (f"; model exported to {final}" if final else ""), flush=True)
    return contract.EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
