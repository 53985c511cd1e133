"""``python -m rlhf_trainer {sft,reward,ppo} --config FILE``."""

import sys

from .cli import main

sys.exit(main())
