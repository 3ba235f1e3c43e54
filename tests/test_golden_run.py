"""The golden run (experiments/golden/golden_run.py): a fresh 50-step run's losses equal the committed record to
its stated relative tolerance, so a change of numerics from maskjax's code or from a dependency upgrade is caught.
For an intended change, re-record with `python experiments/golden/golden_run.py` and say why in the commit."""

import importlib.util
import json
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _golden_module():
    path = os.path.join(REPO, "experiments", "golden", "golden_run.py")
    spec = importlib.util.spec_from_file_location("golden_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_fresh_golden_run_reproduces_the_recorded_losses(tmp_path):
    golden = _golden_module()
    with open(golden.GOLDEN) as f:
        record = json.load(f)
    sensitivity = record["sensitivity (max relative loss difference)"]
    # The tolerance separates noise from change on the recorded measurements themselves.
    assert sensitivity["xla_backend_optimisation_on_vs_off"] < record["rtol"] < \
        sensitivity["learning_rate_0.1_percent_higher"]
    losses = golden.run_losses(str(tmp_path))
    want = np.asarray(record["losses"])
    relative = np.abs(np.asarray(losses) - want) / np.abs(want)
    first_bad = int(np.argmax(relative > record["rtol"]))
    assert relative.max() <= record["rtol"], (
        f"numerics changed: step {first_bad + 1} loss {losses[first_bad]!r} vs recorded {want[first_bad]!r} "
        f"(relative {relative[first_bad]:.2e} > {record['rtol']}); recorded with {record['versions']}. If "
        f"intended, re-record: {record['command']}")
