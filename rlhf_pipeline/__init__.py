"""The main job: runs the example RLHF pipeline through the operator and summarises it."""
