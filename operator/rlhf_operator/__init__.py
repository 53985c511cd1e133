"""Kopf operator reconciling SFTJob, RewardModelJob and PPOJob into trainer pods."""

__version__ = "0.1.0"
