"""Every key of every config file is read by something (issue 14): a setting that is accepted but has no effect is a
defect. Each file in configs/ runs in its `runlocal` form (2 steps, every evaluator once) while the reads of its
ConfigDict are recorded; a key that no code reads by name is reported.

What counts as a read: a leaf accessed by name (`config.a.b`, `config["a"]`, `config.get("a")`) from outside
ml_collections. Whole-config walks do not count (`items()`, serialisation, the unknown-key check, the config saved
with checkpoints), and neither does validation, which reads keys only to check them.
"""

import contextlib
import importlib.util
import os
import sys
from unittest import mock

import jax
import ml_collections
import pytest

from maskjax.train.config import flat_keys
from maskjax.train.trainer import Trainer
from tests.configs import override

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
_DIRECT = {"__getattr__", "__getitem__", "get"}
_NOT_USES = {"flat_keys", "flat_config", "check_known_keys", "schema_of", "resume_changes", "validate",
             "validate_vit", "validate_mae", "validate_tokenizer", "validate_maskgit_model", "validate_config",
             "validate_evals", "check_target_and_scores",
             "_check_resume_config", "to_json_best_effort"}
# Keys read only on paths a 2-step local run does not take, each with where it is read.
READ_ELSEWHERE = {
    "distributed_timeout": "maskjax/main.py, before jax.distributed.initialize",
    "resume_policy": "Trainer._check_resume_config, when a resumed config differs from the checkpoint's",
    "init_from.step": "Trainer._init_from_checkpoint, when init_from.workdir is set",
    "init_from.params_key": "Trainer._init_from_checkpoint, when init_from.workdir is set",
    "init_from.target_key": "Trainer._init_from_checkpoint, when init_from.workdir is set",
    "mim.teacher.step": "mim.teacher_from_config, when a teacher is used",
    "mim.teacher.params_key": "mim.teacher_from_config, when a teacher is used",
    "tokenizer.perceptual_workdir": "TokenizerTask.__init__, when tokenizer.perceptual_weight > 0",
    "tokenizer.perceptual_step": "TokenizerTask.__init__, when tokenizer.perceptual_weight > 0",
    "tokenizer.adversarial_start": "TokenizerTask.loss, when tokenizer.adversarial_weight > 0",
}


@contextlib.contextmanager
def recording(config: ml_collections.ConfigDict):
    """Yields the set of dotted keys of `config` read by name while the context is open."""
    paths = {}

    def index(node, prefix):
        paths[id(node)] = prefix
        for name, value in node._fields.items():
            if isinstance(value, ml_collections.ConfigDict):
                index(value, f"{prefix}{name}.")
    index(config, "")
    reads = set()
    original = ml_collections.ConfigDict.__getitem__
    ml_dir = os.path.dirname(ml_collections.__file__)

    def recorded_getitem(self, key):
        value = original(self, key)
        if id(self) in paths and isinstance(key, str) and not isinstance(value, ml_collections.ConfigDict):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(ml_dir):
                if frame.f_code.co_name not in _DIRECT:
                    return value  # a walk over the whole dict (items, serialisation), not a use
                frame = frame.f_back
            if frame is not None and frame.f_code.co_name not in _NOT_USES:
                reads.add(paths[id(self)] + key)
        return value

    with mock.patch.object(ml_collections.ConfigDict, "__getitem__", recorded_getitem):
        yield reads


def reads_of_run(config: ml_collections.ConfigDict, workdir: str) -> set[str]:
    """The keys a short run of `config` reads by name."""
    with recording(config) as reads:
        Trainer(config, workdir, devices=jax.devices()[:1]).run()
    return reads


def candidate_keys(config: ml_collections.ConfigDict) -> set[str]:
    """The keys that must be read: all but READ_ELSEWHERE, free-form options, and the options of evaluators switched
    off with every=-1."""
    off = tuple(f"evals.{name}." for name, entry in config.evals._fields.items() if entry._fields["every"] < 0)
    from maskjax.tasks import get_task
    task = config._fields["task"]
    free = tuple(f"{task}.{sub}." for sub in get_task(task).free_form)
    return {k for k in flat_keys(config) if not k.startswith(off + free)} - set(READ_ELSEWHERE)


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"config_{name[:-3]}", os.path.join(CONFIG_DIR, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def short(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same keys, 2 steps, small evaluations (values change, never the set of keys)."""
    override(config, total_steps=2, checkpoint_every=2, log_every=1, progress_bar=False,
             optimizer__warmup_steps=1, data__num_threads=0, async_checkpointing=False)
    for entry in config.evals.values():
        for key, value in (("examples", 40), ("count", 2), ("train_examples", 40), ("eval_examples", 40),
                           ("batch_size", 20)):
            if key in entry:
                entry[key] = value
        if entry.every > 0:
            entry.every = 2
    return config


CONFIG_FILES = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))
# Settings that matter only for some choices of other settings, read in the runs that make those choices.
VARIANTS = {
    "vit_builtin.py": [dict(classification__masksub_ratio=0.5)],
    "mae_builtin.py": [dict(mim__masking="hard_patch"),
                       dict(mim__masking="attention", mim__attention_scores="teacher", mim__teacher__workdir=None)],
}


# Fashion-MNIST config files whose task (and so whose keys) another file of the group already runs, on the built-in
# data: checked against their task's reads without a run of their own. The Fashion-MNIST data keys are read by the
# runs of vit_fashion_mnist.py and tokenizer_fashion_mnist.py.
CHECKED_WITHOUT_A_RUN = ("mae_fashion_mnist.py", "maskgit_fashion_mnist.py",
                         # TFDS recipes that need TensorFlow and data files; their task runs on the built-in shapes.
                         "eomt_coco_panoptic.py", "eomt_ade20k.py")


def task_of(name: str) -> str:
    return load(name).get_config("runlocal").task


# Groups that share no run, one test each, so the pytest-xdist workers check them side by side: the encoder
# configs (vit_builtin's checkpoint is the MIM teacher), the generator configs (tokenizer runs feed the
# generators) and the segmentation configs.
GENERATOR_TASKS = ("tokenizer", "maskgit", "autoregressive", "m2t")
SEGMENTATION_TASKS = ("segmentation", "semantic_segmentation")


def _group(name: str) -> str:
    task = task_of(name)
    return "generators" if task in GENERATOR_TASKS else "segmentation" if task in SEGMENTATION_TASKS else "encoders"


GROUP_OF = {name: _group(name) for name in CONFIG_FILES}
_READS: dict = {}


def reads_of_group(group: str, tmp_path_factory) -> dict:
    """{task: keys read by name in any short run of a config file of that task (or one of its VARIANTS)}, for
    the config files of `group`; computed once per process."""
    if group in _READS:
        return _READS[group]
    from maskjax.data import fashion_mnist

    reads, teacher, tokenizers = {}, None, {}
    first = ("vit_builtin.py", "tokenizer_builtin.py", "tokenizer_fashion_mnist.py")  # producers run first
    names = [n for n in CONFIG_FILES if GROUP_OF[n] == group and n not in CHECKED_WITHOUT_A_RUN]
    for name in sorted(names, key=lambda n: (n not in first, n)):
        base = load(name).get_config("runlocal")
        if base.data.name == "fashion_mnist" and not fashion_mnist.available():
            continue
        for variant in [{}] + VARIANTS.get(name, []):
            config = short(load(name).get_config("runlocal"))
            if "mim__teacher__workdir" in variant:
                variant = dict(variant, mim__teacher__workdir=teacher)
            override(config, **variant)
            if "tokenizer_workdir" in config.get(config.task, {}):
                override(config, **{f"{config.task}__tokenizer_workdir": tokenizers[config.data.name]})
            workdir = str(tmp_path_factory.mktemp(name[:-3]))
            reads.setdefault(config.task, set()).update(reads_of_run(config, workdir))
            if name == "vit_builtin.py" and not variant:
                teacher = workdir  # a classifier checkpoint for the MIM teacher variant
            if config.task == "tokenizer" and not variant:
                tokenizers[config.data.name] = workdir
    _READS[group] = reads
    return reads


@pytest.mark.parametrize("group", ["encoders", "generators", "segmentation"])
def test_every_key_of_every_config_file_is_read(group, tmp_path_factory):
    from maskjax.data import fashion_mnist

    reads = reads_of_group(group, tmp_path_factory)
    dead, not_run = {}, []
    for name in (n for n in CONFIG_FILES if GROUP_OF[n] == group):
        config = load(name).get_config("runlocal")
        if config.data.name == "fashion_mnist" and not fashion_mnist.available():
            not_run.append(name)
            continue
        unread = sorted(candidate_keys(config) - reads[config.task])
        if unread:
            dead[name] = unread
    assert not dead, f"keys no code reads, per config file: {dead}"
    if not_run:
        pytest.skip(f"checked the others; not run without the Fashion-MNIST IDX files: {not_run} "
                    "(sudo apt-get install dataset-fashion-mnist)")


def test_a_key_nothing_reads_is_reported(tmp_path):
    # As if the trainer forgot config.stop_after_steps (as it once ignored config.model.name).
    config = short(load("vit_builtin.py").get_config("runlocal"))
    with mock.patch.object(Trainer, "_should_stop", lambda self, signalled, steps: signalled):
        reads = reads_of_run(config, str(tmp_path))
    assert "stop_after_steps" in candidate_keys(config) - reads
    assert "batch_size" in reads and "evals.eval.examples" in reads
