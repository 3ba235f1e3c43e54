"""experiments/segmentation/reproduce.py's lanes: every run in exactly one lane, lanes on disjoint CPU sets."""
import json
import os
import sys

import numpy as np
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


def write_run(workdir, steps, pq):
    os.makedirs(workdir)
    (workdir / "config.json").write_text(json.dumps({"batch_size": 32}))
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": steps // 2, "train/images_per_second": 10.0, "eval/pq": pq / 2}) + "\n")
        f.write(json.dumps({"step": steps, "train/images_per_second": 20.0, "eval/pq": pq}) + "\n")


def test_a_report_takes_runs_without_a_workdir_from_an_earlier_results_file(tmp_path):
    args = reproduce.build_parser().parse_args(["--seeds", "0", "1", "--steps", "40", "--workdirs", str(tmp_path)])
    runs = reproduce.plan(["points"], [0, 1])  # eomt_s0, eomt_full_s0, eomt_s1, eomt_full_s1
    write_run(tmp_path / "eomt_s1", 40, 0.5)  # finished here
    write_run(tmp_path / "eomt_full_s1", 20, 0.9)  # not finished at 40 steps: missing, not reused
    earlier = {"command": "python experiments/segmentation/reproduce.py --seeds 0 --steps 40",
               "curves": {"eomt_s0": {"20": {"pq": 0.1}, "40": {"pq": 0.3}}, "eomt_s1": {"40": {"pq": 0.0}}},
               "train_minutes": {"eomt_s0": 7.0}, "cores": {"eomt_s0": "1"}, "wall_seconds": {}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    later = tmp_path / "later.json"  # a second file: only runs the first one lacks come from it
    later.write_text(json.dumps({**earlier, "curves": {"eomt_s0": {"40": {"pq": 0.7}}, "eomt_full_s0": {"40": {}}}}))
    got = reproduce.collect(runs, args, reproduce.load_earlier([str(path), str(later)], args))
    assert got["reused"] == {"eomt_s0": str(path), "eomt_full_s0": str(later)}
    assert got["missing"] == ["eomt_full_s1"]
    assert got["curves"]["eomt_s0"] == {20: {"pq": 0.1}, 40: {"pq": 0.3}}  # integer steps, as from a workdir
    assert got["curves"]["eomt_s1"] == {20: {"pq": 0.25}, 40: {"pq": 0.5}}  # the workdir wins over the file
    rate = np.percentile([10.0, 20.0], 90, method="lower")  # the logged rates' 90th percentile, no interpolation
    assert got["train_minutes"]["eomt_s1"] == pytest.approx(40 * 32 / rate / 60)
    assert got["train_minutes"]["eomt_s0"] == 7.0 and got["cores"]["eomt_s0"] == "1"
    other = reproduce.build_parser().parse_args(["--steps", "40", "--eval-examples", "100"])
    with pytest.raises(ValueError, match=r"another protocol.*'eval_examples': \(500, 100\)"):
        reproduce.load_earlier([str(later), str(path)], other)


def test_pretrained_study_fine_tunes_from_its_own_pretraining_runs():
    runs = reproduce.plan(["pretrained"], [0, 1], "w")
    args = reproduce.build_parser().parse_args(["--pretrain-steps", "7", "--steps", "9"])
    starts = {name: overrides["init_from.workdir"] for name, (_, overrides) in runs.items()
              if "init_from.workdir" in overrides}
    assert sorted(starts) == ["eomt_mae_s0", "eomt_mae_s1", "mask2former_mae_s0", "mask2former_mae_s1"]
    for name, workdir in starts.items():  # each seed's fine-tunes start from that seed's pretraining run
        pretrain = os.path.basename(workdir)
        assert workdir == os.path.join("w", pretrain) and pretrain == f"{reproduce.PRETRAIN}_s{name[-1]}"
        assert runs[pretrain][1]["seed"] == runs[name][1]["seed"]
        assert reproduce.steps_of(pretrain, args) == 7 and reproduce.steps_of(name, args) == 9
    assert {"eomt_s0", "mask2former_s0"} <= set(runs)  # the from-scratch references


def test_lanes_share_out_only_the_runs_still_to_finish(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    started = []
    monkeypatch.setattr(reproduce.sweep, "run", lambda config, workdir, overrides, steps, cores=None:
                        started.append((os.path.basename(workdir), tuple(cores))))
    args = reproduce.build_parser().parse_args(["--steps", "40", "--workdirs", str(tmp_path), "--lanes", "2"])
    runs = reproduce.plan(["points"], [1, 2])  # eomt_s1, eomt_full_s1, eomt_s2, eomt_full_s2
    for name in ("eomt_s1", "eomt_s2"):
        write_run(tmp_path / name, 40, 0.5)
    reproduce.train(runs, args, {})
    assert sorted(started) == [("eomt_full_s1", (0,)), ("eomt_full_s2", (1,))]  # one per lane, none idle


def test_runs_taken_from_an_earlier_file_are_not_trained_again(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(reproduce.sweep, "run", lambda config, workdir, overrides, steps, cores=None:
                        started.append(os.path.basename(workdir)))
    args = reproduce.build_parser().parse_args(["--steps", "40", "--workdirs", str(tmp_path)])
    runs = reproduce.plan(["pretrained"], [0])  # mae_s0, eomt_mae_s0, mask2former_mae_s0, mask2former_s0, eomt_s0
    reproduce.train(runs, args, {}, earlier=[{"path": "e.json", "curves": {"eomt_s0": {}, "mask2former_s0": {}}}])
    assert sorted(started) == ["eomt_mae_s0", "mae_s0", "mask2former_mae_s0"]


def test_a_report_does_not_replace_a_results_file_with_runs_it_does_not_plan(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"curves": {"eomt_s0": {}, "perpixel_s0": {}}, "missing_runs": ["eomt_full_s0"]}))
    reproduce.check_not_replacing(str(path), reproduce.plan(["heads", "points"], [0, 1]))  # covers all three
    with pytest.raises(ValueError, match=r"reports runs this invocation does not plan \(eomt_full_s0, perpixel_s0\)"):
        reproduce.check_not_replacing(str(path), reproduce.plan(["remax"], [0, 1]))
    reproduce.check_not_replacing(str(tmp_path / "absent.json"), {})
