"""Ray orchestration of the RL roles: hosts (`actors.py`) for the same role objects the in-process
stage uses, placed by a driver (`driver.py`) with placement groups, restarts and rollout actors. The
core never imports this package; it needs the `ray` extra only when `rl ray.enabled=true` runs.
"""
