"""experiments/segmentation/reproduce.py's lanes: every run in exactly one lane, lanes on disjoint CPU sets."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                                "segmentation"))
import reproduce  # noqa: E402


def test_lanes_partition_runs_and_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 5})
    runs = reproduce.plan(list(reproduce.STUDIES), [0, 1])
    lanes = reproduce.lanes_of(runs, 2)
    names = [n for lane, _ in lanes for n in lane]
    assert sorted(names) == sorted(runs)
    assert lanes[0][1] == [0, 1] and lanes[1][1] == [2, 3]  # equal shares; the odd CPU stays unused
    assert reproduce.lanes_of(runs, 1) == [(list(runs), None)]  # one lane: unpinned, plan order
    with pytest.raises(ValueError, match="--lanes=6: this process may use only 5 CPUs"):
        reproduce.lanes_of(runs, 6)
