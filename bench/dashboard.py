"""The dashboard's picture from real traffic: `make dashboard`.

No Grafana server ships in any registry reachable here, so this draws deploy/grafana's dashboard itself:
it starts the service (committed model, embedded teacher) and a real Prometheus with the project's rules,
drives stepped traffic (with fallbacks and explanations), then runs every panel's queries through
Prometheus's range API and lays the panels out on the dashboard's own grid with matplotlib.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.launch import ROOT, start_service
from bench.prometheus import Prometheus, running_prometheus
from loadtests.messages import MESSAGES

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sentiment.json"
PICTURE = ROOT / "docs" / "dashboard.png"
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval becomes for a 1 s scrape interval and a short run


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    """(panel, target, PromQL) for every query, with Grafana's interval variable filled in."""
    return [(panel, target, target["expr"].replace("$__rate_interval", RATE_INTERVAL))
            for panel in dashboard["panels"] for target in panel["targets"]]


def _legend(template: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def render(dashboard: dict[str, Any], prometheus: Prometheus, start: float, end: float, out: Path) -> int:
    """Draw every panel on the dashboard's 24-column grid; returns the number of series drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    figure = plt.figure(figsize=(18, rows * 0.42))
    step = max(1.0, (end - start) / 240)
    drawn = 0
    for panel in panels:
        grid = panel["gridPos"]
        axes = figure.add_axes((grid["x"] / 24 + 0.035, 1 - (grid["y"] + grid["h"]) / rows + 0.03,
                                grid["w"] / 24 - 0.05, grid["h"] / rows - 0.07))
        axes.set_title(panel["title"], fontsize=10, loc="left")
        axes.tick_params(labelsize=7)
        series = [(target, s) for _, target, expr in panel_queries({"panels": [panel]})
                  for s in prometheus.query_range(expr, start, end, step)]
        if panel["type"] == "stat":
            axes.axis("off")
            text = "\n".join(f"{_legend(t['legendFormat'], s['metric'])}: {float(s['values'][-1][1]):.3g}"
                             for t, s in series) or "no data"
            axes.text(0.5, 0.5, text, ha="center", va="center", fontsize=14, transform=axes.transAxes)
        elif panel["type"] == "heatmap":
            _heatmap(axes, series, start)
        else:
            for target, s in series:
                xs = [float(t) - start for t, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                axes.plot(xs, ys, linewidth=1.2, label=_legend(target["legendFormat"], s["metric"]))
            if series:
                axes.legend(fontsize=6, loc="upper left")
            axes.set_xlabel("seconds", fontsize=7)
            if panel["fieldConfig"]["defaults"].get("unit") == "s":
                axes.set_ylabel("seconds", fontsize=7)
        drawn += len(series)
    stamp = datetime.datetime.fromtimestamp(end, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    figure.suptitle(f"{dashboard['title']} — drawn from Prometheus's range API, {stamp}", fontsize=12, y=0.995)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return drawn


def _heatmap(axes: Any, series: list[tuple[dict[str, Any], dict[str, Any]]], start: float) -> None:
    """Cumulative `le` buckets -> counts per bucket over time."""
    buckets = sorted((float(s["metric"]["le"]), s) for _, s in series if "le" in s["metric"])
    if not buckets:
        axes.text(0.5, 0.5, "no data", ha="center", transform=axes.transAxes)
        return
    times = [float(t) - start for t, _ in buckets[0][1]["values"]]
    cumulative = [[float(v) for _, v in s["values"]][:len(times)] for _, s in buckets]
    counts = [[c - (cumulative[i - 1][k] if i else 0) for k, c in enumerate(row)] for i, row in enumerate(cumulative)]
    counts = [[0.0 if math.isnan(c) else c for c in row] for row in counts]
    axes.imshow(counts, aspect="auto", origin="lower", cmap="viridis",
                extent=(times[0], times[-1] if len(times) > 1 else times[0] + 1, 0, len(buckets)))
    axes.set_yticks([i + 0.5 for i in range(len(buckets))], [f"≤{le:g}" for le, _ in buckets], fontsize=6)
    axes.set_xlabel("seconds", fontsize=7)


async def drive(url: str, steps: list[tuple[int, float]]) -> dict[str, int]:
    """Stepped closed-loop traffic (users, seconds): 15% of requests ask for the automatic fallback and 5%
    force the teacher, a third ask for aspects, and one user asks for an explanation every few seconds.
    Answers by status code."""
    statuses: dict[str, int] = {}
    rng = random.Random(7)

    async def user(client: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            draw = rng.random()
            body = {"texts": rng.sample(MESSAGES, rng.randint(1, 3)),
                    "fallback": "always" if draw < 0.05 else "auto" if draw < 0.2 else "never",
                    "aspects": rng.random() < 0.33}
            status = (await client.post("/v1/sentiment", json=body)).status_code
            statuses[str(status)] = statuses.get(str(status), 0) + 1

    async def explainer(client: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            status = (await client.post("/v1/sentiment/explain", json={"text": rng.choice(MESSAGES)})).status_code
            statuses[f"explain {status}"] = statuses.get(f"explain {status}", 0) + 1
            await asyncio.sleep(3)

    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=200)) as client:
        for users, seconds in steps:
            until = time.monotonic() + seconds
            await asyncio.gather(explainer(client, until), *(user(client, until) for _ in range(users)))
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=PICTURE)
    args = parser.parse_args()
    steps = [(1, args.step_seconds), (4, args.step_seconds), (16, args.step_seconds), (48, args.step_seconds),
             (4, args.step_seconds)]
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_service({"SENTIMENT_LOG_LEVEL": "WARNING", "SENTIMENT_FALLBACK_MAX_SHARE": "0.5"},
                                     wait=180, teacher=True)
        try:
            with running_prometheus([url.removeprefix("http://")], Path(tmp)) as prometheus:
                prometheus.wait_for('up{job="sentiment"} == 1')
                start = time.time()
                statuses = asyncio.run(drive(url, steps))
                time.sleep(3)
                end = time.time()
                drawn = render(load_dashboard(), prometheus, start, end, args.out)
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"traffic steps (users, s): {steps}; answers: {statuses}")
    print(f"{drawn} series drawn into {args.out}")


if __name__ == "__main__":
    main()
