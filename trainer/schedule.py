"""The schedule of a training run: the learning rate of each step, and the run's length under a
time budget."""

import math

# max_minutes: the pace is that of the last PACE_WINDOW steps (steps and checkpoints)
PACE_WINDOW = 50
# and is not trusted before this many steps of the run (or of its resume) have passed
PACE_MIN_STEPS = 10


def lr_at(step, total, lr, warmup_steps, decay="constant"):
    """Learning rate of `step` in a run of `total` steps: linear warmup over warmup_steps, then
    constant or ("cosine") a cosine decay to 10% at the last step."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if decay == "cosine":
        return (
            lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total)))))
        )
    return lr * warm


def plan_steps(step, spent, pace, max_minutes, max_steps):
    """The run's length under a time budget: at `step`, with `spent` seconds of training behind it
    and `pace` seconds a step measured lately, the steps that fit in max_minutes (at least `step`,
    at most max_steps)."""
    left = max_minutes * 60 - spent
    return max(step, min(max_steps, step + int(left // max(pace, 1e-9))))


def first_plan(step, spent, planned, max_minutes, max_steps, ended_budget=0.0):
    """The run's length when it (re)starts at `step`: max_steps; under a time budget
    (max_minutes > 0) the plan it stopped with (`planned`) until re-planned, or `step` itself once
    the budget is spent or the run ended by it (`ended_budget`: the budget in minutes it finished
    with; a larger one now continues it)."""
    if max_minutes and (spent >= max_minutes * 60 or max_minutes <= ended_budget):
        return step
    if max_minutes and planned > step:
        return min(max_steps, planned)
    return max_steps
