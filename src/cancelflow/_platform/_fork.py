"""Hooks around ``os.fork``, where a process can fork at all."""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ("CAN_FORK", "at_fork")

#: whether this interpreter can fork (not on Windows)
CAN_FORK = hasattr(os, "fork") and hasattr(os, "register_at_fork")


def at_fork(
    *,
    before: Callable[[], object] | None = None,
    after_in_parent: Callable[[], object] | None = None,
    after_in_child: Callable[[], object] | None = None,
) -> None:
    """``os.register_at_fork`` where processes fork; nothing where they cannot."""
    if not CAN_FORK:
        return
    hooks = {
        name: hook
        for name, hook in (
            ("before", before),
            ("after_in_parent", after_in_parent),
            ("after_in_child", after_in_child),
        )
        if hook is not None
    }
    os.register_at_fork(**hooks)
