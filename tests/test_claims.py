"""claims.claim: a figure against its stated bound, with a verdict that does not show the figure."""

import math

import pytest

from miclip_nb.claims import ClaimError, claim


def test_a_claim_that_holds_prints_its_bound_not_its_value(capsys):
    line = claim("removal beats random", 7.123456, at_least=5.0)
    assert capsys.readouterr().out == line + "\n"
    assert line == "✓ removal beats random (checked: >= 5)"
    assert "7.12" not in line  # the figure moves with float rounding; the verdict must not
    assert claim("within a band", 0.3, at_least=0.1, at_most=0.5).endswith("(checked: >= 0.1 and <= 0.5)")


@pytest.mark.parametrize("value, bounds", [(4.99, {"at_least": 5.0}), (0.51, {"at_most": 0.5}),
                                           (0.05, {"at_least": 0.1, "at_most": 0.5}), (math.nan, {"at_least": 0.0}),
                                           (math.inf, {"at_most": 1e9})])
def test_a_claim_outside_its_bound_raises_with_the_value(value, bounds, capsys):
    with pytest.raises(ClaimError, match="measured"):
        claim("figure", value, **bounds)
    assert capsys.readouterr().out == ""


def test_bounds_are_inclusive_and_required():
    claim("edge", 5.0, at_least=5.0, at_most=5.0)
    with pytest.raises(ValueError, match="at_least"):
        claim("no bound", 1.0)


def test_an_unchecked_claim_says_so_and_shows_the_value(capsys):
    line = claim("removal beats random", -3.0, at_least=5.0, check=False)
    assert line.startswith("· removal beats random (not checked") and "-3" in line
