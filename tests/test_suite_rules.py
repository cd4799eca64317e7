"""The suite's own rules: under CI a missing browser or extra fails instead of skipping."""

from __future__ import annotations

import pytest

from tests.conftest import skip_or_fail_in_ci


def outcome_of(reason: str) -> BaseException:
    # pytest's skip and fail are BaseExceptions that pytest.raises(<the other one>) would let
    # through, turning this test itself into a skip: catch both, then compare.
    with pytest.raises(BaseException) as caught:
        skip_or_fail_in_ci(reason)
    return caught.value


@pytest.mark.parametrize("value", ["true", "1", "True", "yes"])
def test_a_missing_requirement_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    outcome = outcome_of("no Chromium binary")
    assert type(outcome) is pytest.fail.Exception
    assert str(outcome).startswith("required under CI") and str(outcome).endswith("but missing: no Chromium binary")


@pytest.mark.parametrize("value", [None, "", "0", "false"])
def test_a_missing_requirement_skips_outside_ci(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    outcome = outcome_of("no Chromium binary")
    assert type(outcome) is pytest.skip.Exception and str(outcome) == "no Chromium binary"
