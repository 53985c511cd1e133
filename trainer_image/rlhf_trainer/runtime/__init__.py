"""Runtime of the trainer stages: distributed strategy, checkpoints, metrics, failures.

`strategy` is the only module that touches DeepSpeed and torch.distributed. Importing this package
does not import torch; the submodules that need it do.
"""
