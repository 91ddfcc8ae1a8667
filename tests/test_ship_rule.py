"""The rule that decides whether a candidate checkpoint replaces the shipped one (pipeline.eval.ship)."""

from __future__ import annotations

import pytest

from pipeline.eval.ship import HEADLINE, ship_decision


def result(headline: float, check: str | None = "clean", split: str = "test") -> dict:
    model = {"pool_check": {"rsscn7": check, "bigearthnet": "clean"}} if check else {}
    return {"split": split, "model": model, "metrics": {HEADLINE: {"mean": headline}}}


def test_a_clean_candidate_must_beat_a_clean_shipped_checkpoint() -> None:
    assert ship_decision(result(0.63), result(0.62), result(0.52)).ship
    d = ship_decision(result(0.62), result(0.63), result(0.40))
    assert not d.ship and "does not beat" in d.reason  # +22 over random is not enough against a clean 63


def test_a_leaky_shipped_checkpoint_is_replaced_when_the_goal_is_met() -> None:
    d = ship_decision(result(0.6262), result(0.6405, "leak"), result(0.5176))
    assert d.ship and "upper bound" in d.reason and "+10.86" in d.reason
    miss = ship_decision(result(0.5452), result(0.6405, "leak"), result(0.5176))
    assert not miss.ship and "misses" in miss.reason
    assert not ship_decision(result(0.70), result(0.60, None), result(0.65)).ship  # unknown data: the goal rules


def test_a_leaky_candidate_never_ships_and_only_test_results_count() -> None:
    d = ship_decision(result(0.90, "leak"), result(0.60), result(0.50))
    assert not d.ship and "held-out" in d.reason
    assert not ship_decision(result(0.90, None), result(0.60), result(0.50)).ship
    with pytest.raises(ValueError, match="TEST results only"):
        ship_decision(result(0.7, split="val"), result(0.6), result(0.5))
