"""Kopf operator reconciling SFTJob, RewardModelJob, PPOJob and DPOJob into trainer pods."""

__version__ = "0.1.0"
