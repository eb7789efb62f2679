"""lib/curriculum.py: when a curriculum moves to its next stage."""

import pytest

from lib.curriculum import Curriculum


def test_it_moves_on_once_the_full_window_reaches_the_threshold():
    curriculum = Curriculum(3, threshold=0.75, window=4)
    curriculum.record([True, True, True])
    assert not curriculum.ready()  # 3 of 4 episodes: the window is not full
    curriculum.record([False])
    assert curriculum.win_rate() == 0.75 and curriculum.ready()
    curriculum.advance()
    assert curriculum.stage == 1 and curriculum.wins == [] and not curriculum.ready()
    curriculum.record([True, False, False, True, True, True])  # the window keeps the last 4: 3 of 4 won
    assert curriculum.wins == [False, True, True, True] and curriculum.ready()


def test_it_stays_below_the_threshold_and_at_the_last_stage():
    curriculum = Curriculum(2, threshold=0.5, window=2)
    curriculum.record([True, False, False])
    assert curriculum.win_rate() == 0.0 and not curriculum.ready()
    curriculum.record([True, True])
    curriculum.advance()
    curriculum.record([True, True])
    assert curriculum.win_rate() == 1.0 and not curriculum.ready()  # no stage after the last


def test_its_state_round_trips():
    curriculum = Curriculum(3, threshold=0.5, window=3)
    curriculum.record([True, False])
    restored = Curriculum(3, threshold=0.5, window=3, state=curriculum.state_dict())
    assert (restored.stage, restored.wins) == (0, [True, False])
    restored.record([True])
    assert restored.ready()


@pytest.mark.parametrize("args", [(0, 0.5, 2), (2, 1.5, 2), (2, 0.5, 0)])
def test_bad_settings(args):
    with pytest.raises(ValueError):
        Curriculum(*args)
