"""Step load for Locust (`-f loadtests/locustfile.py,loadtests/steps.py`): users rise in the steps of a
TOML file (SENTIMENT_LOADTEST_SLO, default loadtests/slo.toml), and every request is booked to the step it
ran in, so each step's p50/p99, error ratio and throughput can be judged against that step's gates.
The per-step figures go to SENTIMENT_LOADTEST_STEPS_OUT as JSON when the test stops."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from locust import LoadTestShape, events

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.launch import percentile
from loadtests.slo import DEFAULT, load_plan

CONFIG = load_plan(Path(os.environ.get("SENTIMENT_LOADTEST_SLO", DEFAULT)))
_booked: list[dict[str, Any]] = [{"users": s["users"], "latencies_ms": [], "failures": 0, "texts": 0}
                                 for s in CONFIG["steps"]]
_clock: dict[str, float] = {}


class Steps(LoadTestShape):
    """Users = the current step's; stops after the last step."""

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        index = int(elapsed // CONFIG["step_seconds"])
        if index >= len(CONFIG["steps"]):
            return None
        _clock["start"] = time.perf_counter() - elapsed
        users = CONFIG["steps"][index]["users"]
        return users, float(users)  # reach the step's users within about a second


@events.request.add_listener
def _book(name: str, response_time: float, exception: BaseException | None, **_: Any) -> None:
    if "start" not in _clock:
        return
    elapsed = time.perf_counter() - _clock["start"]
    index = int(elapsed // CONFIG["step_seconds"])
    if index >= len(_booked) or elapsed - index * CONFIG["step_seconds"] < CONFIG["settle_seconds"]:
        return
    step = _booked[index]
    step["latencies_ms"].append(response_time)
    step["failures"] += exception is not None
    step["texts"] += 1 if "[1 text]" in name else 5  # the batch task sends 2-8 texts: 5 on average


@events.test_stop.add_listener
def _write(**_: Any) -> None:
    out = os.environ.get("SENTIMENT_LOADTEST_STEPS_OUT")
    if not out:
        return
    judged = CONFIG["step_seconds"] - CONFIG["settle_seconds"]
    figures = []
    for step, plan in zip(_booked, CONFIG["steps"], strict=True):
        latencies = step["latencies_ms"]
        count = len(latencies)
        figures.append({"users": plan["users"], "requests": count, "failures": step["failures"],
                        "error_ratio": step["failures"] / count if count else 1.0,
                        "requests_per_s": count / judged, "texts_per_s": step["texts"] / judged,
                        "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
                        "gate_p99_ms": plan.get("p99_ms"), "gate_error_ratio": plan.get("max_error_ratio")})
    Path(out).write_text(json.dumps(figures, indent=2))
