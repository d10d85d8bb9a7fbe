"""Aspect-level sentiment: clause spans, taxonomy files (good and bad), the method on the committed
models, the HTTP contract over a real service, the metric, the teacher's aspect prompt against the
real embedded teacher, the evaluation sets and command, and the encoder export."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.aspect_eval import ASPECT_SETS, load_aspect_set, score_pairs
from service.artifact import LABELS, cpu_flags, runs_exactly
from service.aspects import AspectModel, SentenceEncoder, calibrated, clauses
from service.prompts import aspect_prompt, parse_aspects
from service.settings import DEFAULT_ASPECT_MODEL_DIR, DEFAULT_MODEL_DIR
from service.taxonomy import DEFAULT_TAXONOMY, TaxonomyError, load_taxonomy
from service.teacher import OK, UNPARSEABLE, TeacherClient
from service.weights import S8_FLAGS
from tests.conftest import ROOT, Service, run_module, running_service

HEADLINE = "The delivery was fast but the support agent was rude."
RESTAURANT = """
version = "restaurant-v1"
[[aspects]]
name = "food"
description = "dishes, taste, portions, freshness"
examples = ["the pasta was delicious", "the steak was overcooked"]
[[aspects]]
name = "staff"
description = "waiters, service, friendliness"
examples = ["the waiter was rude", "our server was lovely"]
"""


# --- clause segmentation ---------------------------------------------------------------------------

def test_clauses_split_at_contrast_commas_and_new_subjects() -> None:
    text = "The courier was late, but the driver was polite and the box was fine. Thanks!"
    pieces = [text[s:e] for s, e in clauses(text)]
    assert pieces == ["The courier was late", "but the driver was polite", "and the box was fine", "Thanks"]


def test_clauses_split_at_and_before_a_bare_noun_and_verb_or_a_verb_alone() -> None:
    for text, pieces in (("website is easy to use and delivery was fast", ["website is easy to use",
                                                                          "and delivery was fast"]),
                         ("the flowers were gorgeous and arrived on time", ["the flowers were gorgeous",
                                                                           "and arrived on time"])):
        assert [text[s:e] for s, e in clauses(text)] == pieces


def test_clauses_keep_and_inside_a_phrase() -> None:
    text = "fast and reliable shipping"
    assert [text[s:e] for s, e in clauses(text)] == [text]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_clause_spans_are_ordered_trimmed_and_inside_the_text(text: str) -> None:
    end_before = 0
    for start, end in clauses(text):
        assert end_before <= start < end <= len(text)
        piece = text[start:end]
        assert piece == piece.strip() and any(ch.isalnum() for ch in piece)
        end_before = end


# --- taxonomy files --------------------------------------------------------------------------------

def test_default_taxonomy_has_the_six_customer_service_aspects() -> None:
    taxonomy = load_taxonomy(DEFAULT_TAXONOMY)
    assert taxonomy.names == ["delivery", "product", "price", "support", "billing", "app"]
    assert all(aspect.examples for aspect in taxonomy.aspects)
    assert "couriers" in taxonomy.aspects[0].phrases()


@pytest.mark.parametrize(("content", "names"), [
    ("this is = not toml [", "not valid TOML"),
    ('version = "x"', "aspects: give at least one"),
    ('[[aspects]]\nname = "Delivery"\ndescription = "d"', "aspects[0].name: must match"),
    ('[[aspects]]\nname = "delivery"', "aspects[0].description: must be a non-empty string"),
    ('[[aspects]]\nname = "a"\ndescription = "d"\n[[aspects]]\nname = "a"\ndescription = "e"',
     "aspects[1].name: 'a' appears twice"),
    ('[[aspects]]\nname = "a"\ndescription = "d"\ncolour = "red"', "aspects[0]: unknown key(s) colour"),
    ('[[aspects]]\nname = "a"\ndescription = "d"\nexamples = "one"', "aspects[0].examples: must be a list"),
    ('threshold = 1.5\n[[aspects]]\nname = "a"\ndescription = "d"', "threshold: must be a number between 0 and 1"),
    ('aspects = ["a"]', "aspects[0]: must be a table"),
])
def test_bad_taxonomy_files_are_refused_naming_the_field(tmp_path: Path, content: str, names: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(TaxonomyError) as caught:
        load_taxonomy(path)
    assert str(caught.value).startswith(str(path)) and names in str(caught.value)


def test_missing_taxonomy_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TaxonomyError, match="taxonomy file not found"):
        load_taxonomy(tmp_path / "nope.toml")


def test_service_refuses_to_start_with_a_bad_taxonomy(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[aspects]]\nname = "ok"\ndescription = ""')
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SENTIMENT_ASPECT_TAXONOMY": str(path), "SENTIMENT_PORT": "0"})
    assert result.returncode == 2
    assert "aspects[0].description" in result.stderr and str(path) in result.stderr


# --- the method on the committed models ------------------------------------------------------------

@pytest.fixture(scope="module")
def aspect_model() -> AspectModel:
    from service.artifact import load_artifact
    from service.runner import ModelRunner

    model = AspectModel(SentenceEncoder(DEFAULT_ASPECT_MODEL_DIR), load_taxonomy(DEFAULT_TAXONOMY))
    model.measure_priors(ModelRunner(load_artifact(DEFAULT_MODEL_DIR)))
    return model


def test_encoder_loads_u8_weights_as_s8_only_where_that_is_exact_and_changes_no_embedding() -> None:
    vnni = SentenceEncoder(DEFAULT_ASPECT_MODEL_DIR, threads=1, flags={"avx2", "avx512_vnni"})
    avx2 = SentenceEncoder(DEFAULT_ASPECT_MODEL_DIR, threads=1, flags={"avx2"})
    assert (vnni.load_weights_as, avx2.load_weights_as) == ("s8", "")
    if runs_exactly(S8_FLAGS, cpu_flags()):  # elsewhere s8 products may saturate: the rule's reason
        pieces = [ex.text[s:e] for ex in load_aspect_set(ASPECT_SETS / "dev.tsv")[:40] for s, e in clauses(ex.text)]
        np.testing.assert_array_equal(vnni.embed(pieces), avx2.embed(pieces))


def test_aspect_clauses_and_regions(aspect_model: AspectModel) -> None:
    located = aspect_model.locate([HEADLINE, "Hello, I have a question."])
    assert [c.aspect for c in located[0]] == ["delivery", "support"]
    assert [HEADLINE[s:e] for s, e in (c.span for c in located[0])] == [
        "The delivery was fast", "but the support agent was rude"]
    assert located[1] == []


def test_locate_stops_at_the_deadline(aspect_model: AspectModel) -> None:
    import time

    with pytest.raises(TimeoutError):
        aspect_model.locate([HEADLINE] * 3, deadline=time.perf_counter() - 1)
    assert len(aspect_model.locate([HEADLINE], deadline=time.perf_counter() + 60)) == 1


def test_region_takes_in_the_aspect_less_verdict_after_it(aspect_model: AspectModel) -> None:
    text = "My parcel arrived two days early, great job!"
    [clause] = aspect_model.locate([text])[0]
    assert clause.aspect == "delivery"
    assert text[slice(*clause.span)] == "My parcel arrived two days early"
    assert text[slice(*clause.region)] == "My parcel arrived two days early, great job"


def test_calibration_divides_out_the_polarity_prior_and_keeps_neutral() -> None:
    probs = np.array([0.5, 0.2, 0.3])
    out = calibrated(probs, np.array([0.6, 0.3, 0.1]))  # the aspect's terms read negative
    assert out[1] == pytest.approx(0.2) and out.sum() == pytest.approx(1.0)
    assert out[2] > out[0]  # 0.3/0.1 beats 0.5/0.6
    assert np.allclose(calibrated(probs, np.array([0.3, 0.4, 0.3])), probs)  # a balanced prior changes nothing


def test_custom_taxonomy_needs_no_retraining(tmp_path: Path) -> None:
    path = tmp_path / "restaurant.toml"
    path.write_text(RESTAURANT)
    model = AspectModel(SentenceEncoder(DEFAULT_ASPECT_MODEL_DIR), load_taxonomy(path))
    located = model.locate(["The pasta was delicious but the waiter ignored us for an hour."])[0]
    assert [c.aspect for c in located] == ["food", "staff"]


# --- HTTP contract over the real service -----------------------------------------------------------

@pytest.fixture(scope="module")
def committed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The real service with the committed student and aspect encoder, default taxonomy."""
    with running_service(DEFAULT_MODEL_DIR, tmp_path_factory.mktemp("logs")) as svc:
        yield svc


def test_aspects_off_by_default_and_absent_from_results(committed: Service) -> None:
    with committed.client() as client:
        body = client.post("/v1/sentiment", json={"text": HEADLINE}).json()
    assert "aspects" not in body["results"][0]


def test_aspects_on_names_the_praised_and_the_blamed(committed: Service) -> None:
    texts = [HEADLINE, "Thanks!", "I was charged twice and the app crashed at checkout."]
    with committed.client() as client:
        response = client.post("/v1/sentiment", json={"texts": texts, "aspects": True})
        assert response.status_code == 200
        results = response.json()["results"]
        metrics = client.get("/metrics").text
    headline, thanks, billing = (r["aspects"] for r in results)
    assert results[0]["label"] == "negative"  # the document-level verdict is unchanged
    assert [(a["aspect"], a["label"]) for a in headline] == [("delivery", "positive"), ("support", "negative")]
    assert thanks == []
    assert {a["aspect"] for a in billing} == {"billing", "app"}
    for text, result in zip(texts, results, strict=True):
        for aspect in result["aspects"]:
            start, end = aspect["span"]
            assert 0 <= start < end <= len(text) and text[start:end].strip()
            assert aspect["label"] in LABELS and 0 < aspect["score"] <= 1
    assert 'sentiment_aspect_predictions_total{aspect="delivery",label="positive"} 1.0' in metrics
    assert 'sentiment_aspect_predictions_total{aspect="price",label="negative"} 0.0' in metrics
    assert "sentiment_aspect_locate_seconds_count 1.0" in metrics


def test_aspects_must_be_a_boolean(committed: Service) -> None:
    with committed.client() as client:
        response = client.post("/v1/sentiment", json={"text": HEADLINE, "aspects": "yes"})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "aspects"


def test_model_route_reports_the_encoder_and_taxonomy(committed: Service) -> None:
    with committed.client() as client:
        aspects = client.get("/v1/model").json()["aspects"]
    assert aspects["taxonomy"]["version"] == "customer-service-v1"
    assert [a["name"] for a in aspects["taxonomy"]["aspects"]][:2] == ["delivery", "product"]
    assert aspects["encoder"]["name"] == "aspect-minilm-int8" and 0 < aspects["threshold"] < 1
    assert aspects["encoder"]["load_weights_as"] == ("s8" if runs_exactly(S8_FLAGS, cpu_flags()) else "")


def test_a_request_whose_aspect_clauses_cannot_fit_the_queue_is_a_clear_422(tmp_path: Path) -> None:
    with running_service(DEFAULT_MODEL_DIR, tmp_path, SENTIMENT_QUEUE_SIZE="4", SENTIMENT_MAX_TEXTS="4") as svc, \
            svc.client() as client:
        fits = client.post("/v1/sentiment", json={"texts": [HEADLINE], "aspects": True})
        too_many = client.post("/v1/sentiment", json={"texts": [HEADLINE] * 3, "aspects": True})
    assert fits.status_code == 200 and len(fits.json()["results"][0]["aspects"]) == 2
    assert too_many.status_code == 422
    error = too_many.json()["error"]
    assert error["details"][0]["field"] == "aspects" and "SENTIMENT_QUEUE_SIZE" in error["message"]


def test_custom_taxonomy_file_over_http(tmp_path: Path) -> None:
    path = tmp_path / "restaurant.toml"
    path.write_text(RESTAURANT)
    with running_service(DEFAULT_MODEL_DIR, tmp_path, SENTIMENT_ASPECT_TAXONOMY=str(path)) as svc, svc.client() as c:
        result = c.post("/v1/sentiment", json={"text": "The steak was superb but the waiter was rude.",
                                               "aspects": True}).json()["results"][0]
        metrics = c.get("/metrics").text
    assert [(a["aspect"], a["label"]) for a in result["aspects"]] == [("food", "positive"), ("staff", "negative")]
    assert 'aspect="food"' in metrics and 'aspect="delivery"' not in metrics


def test_aspects_switched_off_is_a_clear_422(tmp_path: Path) -> None:
    with running_service(DEFAULT_MODEL_DIR, tmp_path, SENTIMENT_ASPECTS_ENABLED="false") as svc, svc.client() as c:
        plain = c.post("/v1/sentiment", json={"text": HEADLINE})
        asked = c.post("/v1/sentiment", json={"text": HEADLINE, "aspects": True})
    assert plain.status_code == 200
    assert asked.status_code == 422 and "SENTIMENT_ASPECTS_ENABLED" in asked.json()["error"]["message"]


# --- the teacher's aspect prompt -------------------------------------------------------------------

def test_aspect_answers_are_parsed_strictly() -> None:
    names = ["delivery", "support"]
    assert parse_aspects(" none", names) == {}
    assert parse_aspects("\ndelivery: positive - quick\nSupport: Negative", names) == {
        "delivery": ("positive", "quick"), "support": ("negative", None)}
    for bad in ("", "delivery: great", "price: positive", "delivery: positive\ndelivery: negative",
                "Sure! delivery: positive", "none\ndelivery: positive"):
        assert parse_aspects(bad, names) is None, bad


def test_aspect_prompt_is_versioned_by_taxonomy_and_keeps_only_its_aspects(tmp_path: Path) -> None:
    path = tmp_path / "restaurant.toml"
    path.write_text(RESTAURANT)
    default, custom = aspect_prompt(load_taxonomy(DEFAULT_TAXONOMY)), aspect_prompt(load_taxonomy(path))
    assert default.version == "aspects-v1/customer-service-v1" and custom.version == "aspects-v1/restaurant-v1"
    assert "food (dishes, taste" in custom.system
    shots = "\n".join(answer for _, answer in custom.shots)
    assert not re.search(r"\b(delivery|billing|app|price|support|product):", shots)


def test_real_teacher_answers_the_aspect_prompt(teacher) -> None:
    taxonomy = load_taxonomy(DEFAULT_TAXONOMY)

    async def ask() -> list:
        client = TeacherClient(teacher.url, teacher.model_name, constraint="gbnf", timeout=60)
        try:
            return [await client.aspects(text, aspect_prompt(taxonomy), taxonomy.names)
                    for text in (HEADLINE, "Where is my order?")]
        finally:
            await client.aclose()

    for answer in asyncio.run(ask()):
        assert answer.outcome in (OK, UNPARSEABLE) and answer.seconds > 0
        if answer.outcome == OK:
            assert set(answer.aspects or {}) <= set(taxonomy.names)
            assert all(pair[0] in LABELS for pair in (answer.aspects or {}).values())


# --- evaluation sets, scoring, command, export -----------------------------------------------------

def test_evaluation_sets_are_large_varied_disjoint_and_use_the_taxonomy() -> None:
    names = set(load_taxonomy(DEFAULT_TAXONOMY).names)
    evaluation, dev = load_aspect_set(ASPECT_SETS / "eval.tsv"), load_aspect_set(ASPECT_SETS / "dev.tsv")
    probe = load_aspect_set(ASPECT_SETS / "probe.tsv")
    assert len(evaluation) >= 300
    assert sum(len(ex.gold) >= 2 for ex in evaluation) >= 50 and sum(len(ex.gold) == 3 for ex in evaluation) >= 5
    assert sum(not ex.gold for ex in evaluation) >= 20
    assert all(set(ex.gold) <= names for ex in evaluation + dev + probe)
    assert not {ex.text for ex in evaluation} & {ex.text for ex in dev}
    assert not {ex.text for ex in probe} & ({ex.text for ex in dev} | {ex.text for ex in evaluation})
    assert len({ex.text for ex in evaluation}) == len(evaluation)


def test_pair_scores_ignore_neutral_and_need_both_parts_right() -> None:
    gold = [{"delivery": "positive", "support": "negative"}, {}, {"app": "neutral"}]
    predicted = [{"delivery": "positive", "support": "positive"}, {"price": "negative"}, {"app": "neutral"}]
    scores = score_pairs(gold, predicted)
    assert scores["pairs"] == {"precision": pytest.approx(1 / 3, abs=1e-4), "recall": 0.5, "f1": 0.4, "support": 2}
    assert scores["aspect_detection"]["recall"] == 1.0
    assert scores["no_opinion_messages"] == {"n": 2, "answered_empty": 1}


def test_bad_gold_token_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "set.tsv"
    path.write_text("Fine.\tdelivery*\n")
    with pytest.raises(ValueError, match=r"set.tsv:1: gold token 'delivery\*'"):
        load_aspect_set(path)


def test_aspect_eval_command_scores_the_student(tmp_path: Path) -> None:
    small = tmp_path / "small.tsv"
    small.write_text(f"{HEADLINE}\tdelivery+ support-\nWhere is my order?\t\nThe app crashes all the time.\tapp-\n")
    out = tmp_path / "report.json"
    run_module("distill", "aspect-eval", "--set", str(small), "--no-teacher", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["n"] == 3 and report["student"]["pairs"]["support"] == 3
    assert report["student"]["pairs"]["f1"] >= 0.8 and "teacher" not in report


def test_encoder_export_reproduces_the_committed_encoder(tmp_path: Path) -> None:
    out = tmp_path / "encoder"
    run_module("export.encoder", "--out", str(out))
    made, committed = (json.loads((d / "manifest.json").read_text()) for d in (out, DEFAULT_ASPECT_MODEL_DIR))
    assert made["evaluation"]["int8_fp32_cosine"]["median"] >= 0.98
    assert made["threshold"] == committed["threshold"]
    # The committed encoder came from optimum's avx2 config (QUInt8 weights, per channel); the export now
    # calls ONNX Runtime's quantizer directly with the same weight type and granularity.
    assert (made["quantization"]["weights"], committed["quantization"]["weights"]) == ("u8", "QUInt8")
    assert made["quantization"]["per_channel"] == committed["quantization"]["per_channel"] is True
    # Either spelling of u8 weights is loaded as s8 on a VNNI CPU.
    assert SentenceEncoder(out, threads=1, flags={"avx512_vnni"}).load_weights_as == "s8"
    assert made["evaluation"]["dev_pair_f1"]["int8"] >= made["evaluation"]["dev_pair_f1"]["fp32"] - 0.02
