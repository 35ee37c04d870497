"""The alert load against the budget (`cluster.store.audit.alert_load`), pure."""

from __future__ import annotations

import doctest

import pytest

from cluster.store import audit
from cluster.store.audit import (
    ALERT_BUDGET_PER_CONTAMINATION,
    ALERT_WARNING_MIN_SCORED,
    ALERT_WARNING_PER_BUDGET,
    alert_load,
)


def test_doctests():
    assert doctest.testmod(audit).failed == 0


@pytest.mark.parametrize("contamination", [0.01, 0.02, 0.05])
def test_warning_starts_strictly_above_twice_the_budget(contamination):
    line = ALERT_WARNING_PER_BUDGET * ALERT_BUDGET_PER_CONTAMINATION * contamination
    scored = 10_000
    at_line = round(line * scored)
    load = alert_load(scored, at_line, contamination)
    assert load["budget"] == pytest.approx(ALERT_BUDGET_PER_CONTAMINATION * contamination)
    assert load["warning_above"] == pytest.approx(line) and load["warning"] is None
    assert alert_load(scored, at_line + 1, contamination)["warning"] is not None


def test_too_few_decisions_are_no_warning():
    assert alert_load(ALERT_WARNING_MIN_SCORED - 1, ALERT_WARNING_MIN_SCORED - 1, 0.02)["warning"] is None
    assert alert_load(ALERT_WARNING_MIN_SCORED, ALERT_WARNING_MIN_SCORED, 0.02)["warning"] is not None
    assert alert_load(0, 0, 0.02)["alert_rate"] == 0.0
