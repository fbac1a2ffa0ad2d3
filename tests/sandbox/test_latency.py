"""The latency model's spec, its log-normal draws and Redox's answer limits (no server, no waits)."""

import random
import statistics

import pytest

from sandbox.latency import (
    DEFAULT_MAX_RESPONSE_RECORDS,
    LatencySpec,
    Pacer,
    Spread,
)


def test_none_draws_nothing_and_never_times_out():
    pacer = Pacer(LatencySpec.parse("none"), seed=1)
    assert not pacer.spec.active
    assert pacer.draw("fhir.search") == 0.0
    verdict = pacer.judge("datamodel.query", 10_000)
    assert verdict.status is None and verdict.wait == 0.0


def test_realistic_is_the_documented_preset():
    spec = LatencySpec.parse("realistic")
    assert spec.spread("fhir.search") == Spread(0.4, 3.0) == spec.spread("fhir.read")
    assert spec.spread("datamodel.query") == Spread(1.5, 10.0) == spec.spread("datamodel.patientsearch")
    assert spec.record_seconds == 0.005


def test_explicit_keys_override_their_group():
    spec = LatencySpec.parse("fhir=400ms/3s,fhir.read=50ms/200ms,datamodel=2s,record=1ms,seed=3")
    assert spec.spread("fhir.search") == Spread(0.4, 3.0)
    assert spec.spread("fhir.read") == Spread(0.05, 0.2)
    assert spec.spread("datamodel.query") == Spread(2.0, 2.0)
    assert spec.record_seconds == 0.001 and spec.seed == 3


@pytest.mark.parametrize("bad", ["fhir", "web=1s", "fhir=3s/1s", "fhir=fast"])
def test_bad_specs_are_refused(bad):
    with pytest.raises(ValueError):
        LatencySpec.parse(bad)


def test_draws_have_the_asked_median_and_tail():
    rng = random.Random(5)
    spread = Spread(0.4, 3.0)
    draws = sorted(spread.draw(rng) for _ in range(40_000))
    assert statistics.median(draws) == pytest.approx(0.4, rel=0.05)
    assert draws[int(0.99 * len(draws))] == pytest.approx(3.0, rel=0.12)


def test_same_seed_same_draws():
    a, b = (Pacer(LatencySpec.parse("realistic"), seed=9) for _ in range(2))
    assert [a.draw("fhir.search") for _ in range(20)] == [b.draw("fhir.search") for _ in range(20)]
    c = Pacer(LatencySpec.parse("realistic"), seed=10)
    assert [c.draw("fhir.search") for _ in range(20)] != [a.draw("fhir.search") for _ in range(20)]


def test_an_answer_over_the_cap_is_refused_with_413_after_its_latency():
    pacer = Pacer(LatencySpec.parse("datamodel=1s"), seed=1, max_response_records=200)
    assert pacer.judge("datamodel.query", 200).status is None
    verdict = pacer.judge("datamodel.query", 201)
    assert verdict.status == 413 and verdict.wait == 1.0
    assert "201 records" in verdict.text and "200" in verdict.text
    assert pacer.refused_oversize == 1


def test_a_round_trip_over_the_limit_waits_the_limit_then_504():
    pacer = Pacer(LatencySpec.parse("datamodel=100ms,record=10ms"), seed=1, round_trip_limit=1.0)
    ok = pacer.judge("datamodel.query", 80)
    assert ok.status is None and ok.wait == pytest.approx(0.9)
    late = pacer.judge("datamodel.query", 91)
    assert late.status == 504 and late.wait == 1.0
    assert pacer.round_trip_timeouts == 1


def test_default_cap_comes_from_redox_10_mb():
    assert DEFAULT_MAX_RESPONSE_RECORDS == 14_000
