"""Failure diagnosis: the marks of a trajectory, and the summary over failures."""

import numpy as np

from miclip_nb.diagnose import Trajectory, failure_summary, trajectory_marks


def test_marks_find_dominance_then_overtake():
    best, over = trajectory_marks([0.1, 0.5, 0.4, 0.2, 0.1], [0.1, 0.1, 0.3, 0.3, 0.4])
    assert best == 1 and over == 3


def test_marks_when_truth_never_loses():
    assert trajectory_marks([0.3, 0.35], [0.1, 0.2]) == (0, None)


def test_marks_ignore_losses_before_the_best_layer():
    best, over = trajectory_marks([0.1, 0.6, 0.2], [0.3, 0.1, 0.5])
    assert (best, over) == (1, 2)


def _traj(over, concepts):
    layers = ["a", "b", "c"]
    tops = [[("x", 0.1)], [("y", 0.1)], [(c, 0.2) for c in concepts]]
    return Trajectory(layers, np.zeros(3), np.zeros(3), 0, 1, 0, over, tops)


def test_failure_summary_counts_layers_and_concepts():
    summary = failure_summary([_traj(2, ["dots", "red"]), _traj(2, ["dots"]), _traj(None, ["grid"])])
    assert summary["overtake_counts"].to_dict() == {"c": 2, "never": 1}
    assert summary["concept_counts"].to_dict() == {"dots": 2, "red": 1}
