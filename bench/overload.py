"""Overload: many more clients than the service can serve, each keeping a request in flight.
What a production service owes them: the texts it can serve served, the rest refused at once (503), and
the event loop not so busy refusing that admitted requests miss their deadline. Each service meets two
kinds of client in turn: wrk as it is, sending again the moment it is refused, and wrk honouring
Retry-After (each 503 holds a next request back 1 s).

  python bench/overload.py [--connections 1000] [--texts 5] [--seconds 8] [--rounds 3] [--configs auto]

Services queue the service's default (SENTIMENT_QUEUE_SIZE, 512 texts), not the other benchmarks' 4096.
wrk keeps `connections` requests of `texts` texts each in flight. Per answer status it prints how many
came back per second and their mean time in the app, from the service's own request histogram (wrk's
one latency figure mixes refusals with answers). Each configuration is started afresh every round,
interleaved; medians of the rounds. A benchmark, not a test: the machine is shared, read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serving import MESSAGES, WRK, serve_reporting, wrk_load
from service.settings import DEFAULT_MODEL_DIR, Settings

STATUSES = ("200", "503", "504", "499")  # answered, refused, past the deadline, client gone first


def with_default_queue(config: str) -> str:
    """The benchmarks' services queue 4096 texts, so that a saturated run never refuses; an overload is
    about the refusals, so its services keep the service's own default unless `config` names one."""
    if "queue_size=" in config:
        return config
    return f"{config}{',' if ':' in config else ':'}queue_size={Settings().queue_size}"


def by_status(url: str) -> dict[str, tuple[float, float]]:
    """(count, seconds in the app) of POST /v1/sentiment per status so far."""
    out = {status: (0.0, 0.0) for status in STATUSES}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if not name.startswith("sentiment_request_duration_seconds_") or 'route="/v1/sentiment"' not in name:
            continue
        kind = name.partition("{")[0].rpartition("_")[2]
        status = name.partition('status="')[2].partition('"')[0]
        if status in out and kind in ("count", "sum"):
            count, seconds = out[status]
            out[status] = (count + float(value), seconds) if kind == "count" else (count, seconds + float(value))
    return out


def overload(url: str, connections: int, texts: int, seconds: float, backoff_ms: int) -> dict[str, float]:
    bodies = [{"texts": [MESSAGES[(i + k) % len(MESSAGES)] for k in range(texts)]} for i in range(len(MESSAGES))]
    wrk_load(url, 16, 2.0, bodies=bodies)  # warm
    before = by_status(url)
    wrk_load(url, connections, seconds, bodies=bodies, backoff_ms=backoff_ms)
    after = by_status(url)
    figures = {}
    for status in STATUSES:
        count = after[status][0] - before[status][0]
        figures[f"{status}_per_s"] = count / seconds
        figures[f"{status}_mean_ms"] = (after[status][1] - before[status][1]) / count * 1000 if count else 0.0
    figures["texts_per_s"] = figures["200_per_s"] * texts
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--configs", nargs="+", default=["auto"],
                        help="as bench/serving.py: LAYOUT[:setting=value,...]")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--texts", type=int, default=5, help="texts per request")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if WRK is None:
        print("bench/overload.py needs wrk (apt-get install wrk): a Python client cannot hold this many "
              "connections without starving the service", file=sys.stderr)
        return 2
    clients = {"no back-off": 0, "Retry-After": 1000}  # wrk as it is; wrk pausing 1 s after each 503
    rows: dict[tuple[str, str], list[dict[str, float]]] = {(c, k): [] for c in args.configs for k in clients}
    for round_no in range(args.rounds):
        flip = round_no % 2
        for config in args.configs[::-1] if flip else args.configs:
            process, url = serve_reporting(args.model, "granian", with_default_queue(config), config)
            try:
                for client in list(clients)[::-1] if flip else clients:
                    figures = overload(url, args.connections, args.texts, args.seconds, clients[client])
                    rows[config, client].append(figures)
                    shown = ", ".join(f"{key} {value:.1f}" for key, value in figures.items())
                    print(f"round {round_no + 1} {config}, {client}: {shown}", flush=True)
            finally:
                process.terminate()
                process.wait()
    print(f"\n{args.connections} connections, {args.texts} texts per request, {args.seconds:g} s, "
          f"medians of {args.rounds} rounds")
    print("| config | clients | texts/s served | 200/s (mean ms in the app) | 503/s (mean ms) | 504/s (mean ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (config, client), runs in rows.items():
        med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        cells = [f"{med[f'{s}_per_s']:.0f} ({med[f'{s}_mean_ms']:.0f} ms)" for s in ("200", "503", "504")]
        print(f"| {config} | {client} | {med['texts_per_s']:.0f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
