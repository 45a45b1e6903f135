"""Steps of an apply where the tests interrupt it: BPFILTER_CHECKPOINT=step:action, the
action one of kill (SIGKILL), int (SIGINT, as Ctrl-C) or sleep (two seconds, so that
another apply meets this one). Whatever step an apply dies at, what runs and what `status`
says must agree (tests/test_lifecycle.py)."""

from __future__ import annotations

import os
import signal
import time

ACTIONS = {"kill": lambda: os.kill(os.getpid(), signal.SIGKILL),
           "int": lambda: os.kill(os.getpid(), signal.SIGINT),
           "sleep": lambda: time.sleep(2.0)}


def checkpoint(step: str) -> None:
    wanted = os.environ.get("BPFILTER_CHECKPOINT", "")
    if wanted.partition(":")[0] == step:
        ACTIONS[wanted.partition(":")[2] or "kill"]()
