"""The step plan and SLO gates of `make loadtest` (loadtests/slo.toml), read and checked once."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

DEFAULT = Path(__file__).with_name("slo.toml")


class PlanError(ValueError):
    """The SLO file cannot run; the message names the file and what is wrong."""


def load_plan(path: Path = DEFAULT) -> dict[str, Any]:
    try:
        plan = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlanError(f"{path}: {exc}") from None
    plan.setdefault("step_seconds", 30)
    plan.setdefault("settle_seconds", 3)
    plan.setdefault("think_seconds", 0.0)
    steps = plan.get("steps")
    if not isinstance(steps, list) or not steps:
        raise PlanError(f"{path}: needs at least one [[steps]] table")
    for i, step in enumerate(steps, 1):
        if not isinstance(step.get("users"), int) or step["users"] < 1:
            raise PlanError(f"{path}: step {i}: users must be an integer >= 1")
        for gate in ("p99_ms", "max_error_ratio"):
            if gate in step and not (isinstance(step[gate], int | float) and step[gate] >= 0):
                raise PlanError(f"{path}: step {i}: {gate} must be a number >= 0")
    if not 0 <= plan["settle_seconds"] < plan["step_seconds"]:
        raise PlanError(f"{path}: settle_seconds must be >= 0 and below step_seconds")
    if plan["think_seconds"] < 0:
        raise PlanError(f"{path}: think_seconds must be >= 0")
    return plan
