"""The two kinds of failure every command reports the same way (see `core.cli.user_errors`).

    UserError       the input or the settings are wrong: one line naming the file, column or
                    key, exit 2. Rerunning the same command fails the same way.
    StepIncomplete  the step did all it could, but some units (tasks, shards) did not finish:
                    one line saying how many and the first error, exit 1. Rerunning the same
                    command redoes exactly the missing units.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem the user fixes (a missing column, an unreadable file, a bad setting)."""


class StepIncomplete(RuntimeError):
    """Some units of a step did not finish; a rerun of the same command redoes only those."""
