"""The execution layout: parsed from settings, or measured on this machine and reported."""

from __future__ import annotations

import pytest

from service.artifact import load_artifact
from service.layout import BATCH_SIZES, available_cores, candidate_shapes, choose, parse_shape, throughput
from service.runner import ModelRunner, choose_layout
from service.settings import Settings
from tests.conftest import running_service


@pytest.mark.parametrize(("value", "shape"), [("auto", None), ("2x1", (2, 1)), ("1X2", (1, 2)), ("4x4", (4, 4))])
def test_layout_setting_parses(value, shape) -> None:
    assert parse_shape(value) == shape


@pytest.mark.parametrize("value", ["", "2", "2x", "x1", "0x2", "2x0", "twoxone", "-1x2"])
def test_a_bad_layout_setting_stops_the_start_with_its_name(value) -> None:
    with pytest.raises(ValueError, match="layout"):
        Settings.from_env({"SENTIMENT_LAYOUT": value})


@pytest.mark.parametrize(("cores", "shapes"), [(1, [(1, 1)]), (2, [(1, 2), (2, 1)]),
                                               (6, [(1, 6), (2, 3), (3, 2), (6, 1)])])
def test_candidate_shapes_use_every_core_once(cores, shapes) -> None:
    assert candidate_shapes(cores) == shapes


def test_the_fastest_wins_unless_a_smaller_batch_or_wider_stream_is_as_fast() -> None:
    measured = {(1, 2, 1): 300.0, (1, 2, 8): 400.0, (2, 1, 1): 390.0, (2, 1, 8): 395.0, (2, 1, 16): 500.0}
    assert (choose(measured).streams, choose(measured).max_batch_size) == (2, 16)  # clearly fastest
    measured[(2, 1, 16)] = 405.0  # now 1x2 b8, 2x1 b1, 2x1 b8 are all within 5% of it
    layout = choose(measured)
    assert (layout.streams, layout.threads, layout.max_batch_size) == (2, 1, 1)
    assert "within 5% of the fastest (2x1 batch 16: 405)" in layout.reason
    measured[(1, 2, 1)] = 395.0  # same batch: more threads per stream answers one request sooner
    assert choose(measured).shape == "1x2"


def test_throughput_runs_every_stream_and_counts_texts() -> None:
    calls: list[int] = []
    rate = throughput(lambda chunk: calls.append(len(chunk)), streams=2, sequences=[[1] * n for n in range(1, 20)],
                      batch=4, seconds=0.05)
    assert calls and set(calls) == {4} and rate > 0


def test_choose_layout_measures_the_real_model(tiny_model) -> None:
    layout, runner = choose_layout(load_artifact(tiny_model))
    assert (layout.streams * layout.threads, layout.max_batch_size) in {(available_cores(), b) for b in BATCH_SIZES}
    assert len(layout.measured) == len(candidate_shapes(available_cores())) * len(BATCH_SIZES)
    assert all(value > 0 for value in layout.measured.values())
    assert isinstance(runner, ModelRunner) and runner.session.get_session_options().intra_op_num_threads == \
        layout.threads
    fixed, _ = choose_layout(load_artifact(tiny_model), "1x1", 4)
    assert (fixed.streams, fixed.threads, fixed.max_batch_size, fixed.reason) == (1, 1, 4, "configured")


def test_the_service_reports_the_layout_it_measured(tiny_model, tmp_path) -> None:
    with running_service(tiny_model, tmp_path, SENTIMENT_LAYOUT="auto", SENTIMENT_MAX_BATCH_SIZE="0") as svc, \
            svc.client() as client:
        serving = client.get("/v1/model").json()["serving"]
        assert client.post("/v1/sentiment", json={"texts": ["fine", "awful"]}).status_code == 200
    assert serving["streams"] * serving["threads"] == available_cores()
    assert serving["max_batch_size"] in BATCH_SIZES and "measured here" in serving["reason"]
    assert '"layout chosen"' in svc.log.read_text()
