"""Planner policies: small pure rules that status.plan() calls, one rule per module."""
