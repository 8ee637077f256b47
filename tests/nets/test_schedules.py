"""Learning-rate schedules: the paper's Eq. 8 at its breakpoints."""

from __future__ import annotations

import itertools
import math

import pytest

from nets.schedules import constant_schedule, get_schedule, linear_schedule


@pytest.mark.parametrize("total", [10, 100, 37])
def test_linear_schedule_matches_eq8_at_breakpoints(total):
    lr0, r = 0.05, 0.01
    assert linear_schedule(0, total, lr0) == lr0
    assert linear_schedule(0.5 * total, total, lr0) == lr0  # t/T = 0.5: still alpha_0
    assert math.isclose(linear_schedule(0.7 * total, total, lr0), lr0 * (1 - (1 - r) * 0.5))
    assert math.isclose(linear_schedule(0.9 * total, total, lr0), lr0 * r)  # end of decay
    assert linear_schedule(0.95 * total, total, lr0) == lr0 * r  # flat afterwards
    assert linear_schedule(total, total, lr0) == lr0 * r


def test_linear_schedule_is_continuous_and_monotone():
    values = [linear_schedule(t / 100, 1, 1.0) for t in range(101)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert max(abs(a - b) for a, b in itertools.pairwise(values)) < 0.03


def test_linear_schedule_for_integer_epochs_of_a_100_epoch_run():
    lrs = [linear_schedule(e, 100, 0.1) for e in range(100)]
    assert lrs[50] == 0.1 and lrs[51] < 0.1
    assert math.isclose(lrs[90], 0.001) and lrs[99] == pytest.approx(0.001)


def test_custom_ratio_and_constant():
    assert math.isclose(linear_schedule(9, 10, 1.0, ratio=0.5), 0.5)
    assert constant_schedule(9, 10, 0.3) == 0.3
    assert get_schedule("Constant") is constant_schedule


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"Argument 'total_epochs'"):
        linear_schedule(1, 0, 0.1)
    with pytest.raises(ValueError, match=r"Argument 'epoch'"):
        linear_schedule(-1, 10, 0.1)
    with pytest.raises(ValueError, match=r"Argument 'schedule'"):
        get_schedule("cosine")
