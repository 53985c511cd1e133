"""RLHF trainer: SFT, reward model and PPO stages. Importing the package does not import torch."""

__version__ = "0.1.0"
