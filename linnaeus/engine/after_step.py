"""What runs after an optimizer step: registered actions, each with its own cadence.

Each action says whether it acts after a given step (``due``) and whether acting lets anything leave the process: a
logged row, a validation table, a checkpoint or export file (``publishes``, True unless declared otherwise). Before
any publishing action acts, the non-finite guard is settled (``settle``), so nothing from a non-finite step is logged,
validated or saved; an action added later inherits that without anyone maintaining a list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AfterStep:
    """One action. ``due(step, stop)`` and ``act(step, stop)``: ``stop`` is True when the processes agreed to stop
    (preempted) at this step. Collective actions must be due at the same steps on every process."""

    name: str
    due: Callable[[int, bool], bool]
    act: Callable[[int, bool], None]
    publishes: bool = True  # safe default: a new action is treated as one that writes


def always(step: int, stop: bool) -> bool:
    return True


def run_after_step(actions: Sequence[AfterStep], step: int, stop: bool, settle: Callable[[], None]) -> list[str]:
    """Run the actions due after ``step``, in order, settling the non-finite guard first when any of them
    publishes. Returns the names of the actions that ran."""
    due = [a for a in actions if a.due(step, stop)]
    if any(a.publishes for a in due):
        settle()  # raises NonFiniteError (on every process alike) before anything leaves the process
    for a in due:
        a.act(step, stop)
    return [a.name for a in due]
