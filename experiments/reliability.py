"""Issue 13 ("No silent failures"): inject every fault into a tiny run and tabulate what maskjax does now.

Command (about 5 minutes on 2 CPU cores):
  python experiments/reliability.py [--rows 5,10,ctrl_c]

Each row injects one fault the way a user meets it and runs the real command line (`python -m maskjax.main` in a
subprocess; the attention rows call `maskjax.attention.attention` in a subprocess python snippet), then records the
exit code, the first relevant line of the output, whether the message names what is at fault, and the checks that
nothing was lost. Writes experiments/results/reliability.md and .json; exits 1 if any row FAILs.
"""

import argparse
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "experiments", "results")
PY = sys.executable
TINY = ["--config=configs/vit_builtin.py:runlocal", "--config.progress_bar=False", "--config.evals.eval.examples=100",
        "--config.evals.eval.batch_size=20", "--config.evals.predictions.every=-1", "--config.log_every=1",
        "--config.total_steps=8",
        "--config.checkpoint_every=4"]
LONG = ["--config.total_steps=100000", "--config.checkpoint_every=1000"]  # A run that only a signal stops.
FASHION = "/usr/share/datasets/fashion-mnist"
ERROR = r"^(Error|WARNING)|Error:"  # The default "relevant line" of a run's output.
ROOT = ""  # The temporary directory of all workdirs (set in main).


@dataclasses.dataclass
class Row:
    id: str
    fault: str
    injection: str
    command: str
    outcome: str = ""  # rc and the relevant line(s)
    output: str = ""  # The end of stderr + stdout (JSON only).
    names: object = None  # Whether the message names the path / key / value at fault (None: not applicable).
    check: str = ""
    ok: bool = False
    details: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ helpers
def child_env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MASKJAX_FASHION_MNIST_DIR")}
    return env | {"PYTHONUNBUFFERED": "1"} | (extra or {})


def run(argv, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=child_env(env), capture_output=True, text=True, timeout=timeout)


def cli_argv(w, *extra) -> list:
    return [PY, "-m", "maskjax.main", f"--workdir={w}", *TINY, *extra]


def cli(w, *extra, env=None) -> subprocess.CompletedProcess:
    return run(cli_argv(w, *extra), env)


def rel(text: str, w=None) -> str:
    """Paths as printed in the table: W for the row's workdir, $TMP for the script's temporary directory."""
    return (text.replace(w, "W") if w else text).replace(ROOT, "$TMP").replace(REPO + "/", "")


def shown(argv, w) -> str:
    return "python " + rel(" ".join(argv[1:]).replace(f"-m maskjax.main --workdir={w} " + " ".join(TINY), "TINY"), w)


def report(proc, w, *patterns) -> dict:
    """{'outcome': 'rc=N: <first line matching each pattern>', 'output': end of stderr + stdout}."""
    lines = (proc.stderr + "\n" + proc.stdout).splitlines()
    found = []
    for pattern in patterns or (ERROR,):
        line = rel(next((x.strip() for x in lines if re.search(pattern, x)), "(no line matches)"), w)
        found.append(line if len(line) <= 200 else line[:200] + "...")
    return {"outcome": f"rc={proc.returncode}: " + " / ".join(found), "output": rel("\n".join(lines[-40:]), w)}


def judge(row: Row, checks, names=None, names_needed=True) -> Row:
    """`checks`: [(label, passed)]; `names`: [(regex, text)] that must all match for 'names the fault'."""
    if names is not None:
        row.names = all(re.search(regex, text) for regex, text in names)
        row.details["names_regexes"] = [regex for regex, _ in names]
    row.check = "; ".join(f"{label} {'✓' if ok else '✗'}" for label, ok in checks)
    row.ok = all(ok for _, ok in checks) and (row.names is not False or not names_needed)
    return row


def steps(w) -> list:
    d = os.path.join(w, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def logged(w, key) -> list:
    path = os.path.join(w, "metrics.jsonl")
    records = [json.loads(x) for x in open(path) if x.strip()] if os.path.exists(path) else []
    return [r["step"] for r in records if key in r]


def history(w, event) -> list:
    return [r for r in map(json.loads, open(os.path.join(w, "history.jsonl"))) if r["event"] == event]


def contents(directory) -> dict:
    """{relative path: md5} of every file under `directory`."""
    return {os.path.relpath(os.path.join(d, f), directory): hashlib.md5(open(os.path.join(d, f), "rb").read())
            .hexdigest() for d, _, fs in os.walk(directory) for f in fs}


def moved_aside(w) -> dict:
    """{step: contents without REASON.txt} of the steps in W/damaged_checkpoints/ that have a REASON.txt."""
    d = os.path.join(w, "damaged_checkpoints")
    moved = {int(n.split("-")[0]): contents(os.path.join(d, n)) for n in (os.listdir(d) if os.path.isdir(d) else [])}
    return {s: {k: v for k, v in c.items() if k != "REASON.txt"} for s, c in moved.items() if "REASON.txt" in c}


def snapshot(w) -> dict:
    return {n: open(os.path.join(w, n)).read() for n in ("config.json", "metrics.jsonl", "history.jsonl")}


def largest_array_file(step_dir) -> str:
    found = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
    return max(found, key=os.path.getsize)


def flip(step_dir) -> str:
    path = largest_array_file(step_dir)
    data = bytearray(open(path, "rb").read())
    start = max(0, len(data) // 2 - 200)
    data[start:start + 400] = bytes(b ^ 0xFF for b in data[start:start + 400])
    open(path, "wb").write(bytes(data))
    return f"{path}, {len(data)} bytes"


class Base:
    """One finished TINY run (checkpoints 4 and 8), made on first use; rows work on copies of it."""
    path = None

    @classmethod
    def copy(cls, name) -> str:
        if cls.path is None:
            proc = cli(os.path.join(ROOT, "base"))
            if proc.returncode != 0 or steps(os.path.join(ROOT, "base")) != [4, 8]:
                raise RuntimeError(f"base run failed (rc={proc.returncode}): {proc.stderr[-500:]}")
            cls.path = os.path.join(ROOT, "base")
        shutil.copytree(cls.path, os.path.join(ROOT, name))
        return os.path.join(ROOT, name)


# --------------------------------------------------------------------------------------------- attention rows
PRELUDE = """
import json, jax, jax.numpy as jnp, numpy as np
from maskjax.attention import attention, blocked_attention, causal, reference_attention
B, L, H, D, ROW = 1, 32, 2, 8, 5
q, k, v = (jax.random.normal(jax.random.key(i), (B, L, H, D)) for i in range(3))
ct = jax.random.normal(jax.random.key(9), (B, L, H, D))
kw = lambda b: dict(block_q=16, block_k=16) if b in ("blocked", "pallas") else {}
res = {}
def attempt(name, fn):
    try:
        res[name] = fn()
    except Exception as e:
        res[name] = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0]
"""
ATTENTION = {  # id: (fault, injection, code filling `res`, text shown for a passing case, regex the error must name)
    "1": ("float additive mask passed as mask=", "attention(q,k,v, mask=jnp.where(causal keep, 0., -inf), "
          "backend=b); q,k,v [1,32,2,8], tiles 16", """
keep = jnp.tril(jnp.ones((L, L), bool))[None, None]
def case(b):
    o = attention(q, k, v, mask=jnp.where(keep, 0., -jnp.inf), backend=b, **kw(b))
    return f"returned without error (finite: {bool(jnp.isfinite(o).all())})"
for b in ("reference", "blocked", "pallas", "auto"):
    attempt(b, lambda: case(b))
""", None, r"bias="),
    "2": ("query row fully masked by bias=-inf", "bias [1,1,32,32] of zeros, row 5 = -inf; out and dq (vjp of a "
          "random cotangent)", """
bias = jnp.zeros((1, 1, L, L)).at[:, :, ROW, :].set(-jnp.inf)
def outputs(b):
    o, vjp = jax.vjp(lambda q: attention(q, k, v, bias=bias, backend=b, **kw(b)), q)
    return o, vjp(ct)[0]
ref_o, ref_dq = outputs("reference")
def case(b):
    o, dq = outputs(b)
    return {"out_row_zero": bool((o[:, ROW] == 0).all()), "out_finite": bool(jnp.isfinite(o).all()),
            "dq_finite": bool(jnp.isfinite(dq).all()), "dq_row_zero": bool((dq[:, ROW] == 0).all()),
            "matches_reference": bool(np.allclose(o, ref_o, atol=1e-5) and np.allclose(dq, ref_dq, atol=1e-4))}
for b in ("reference", "blocked", "pallas", "auto"):
    attempt(b, lambda: case(b))
""", "row 5 zeros, dq finite and 0 in row 5, rest = reference", None),
    "3": ("NaN in q (one row)", "q[:, 5] = NaN; no mask and causal()", """
qn = q.at[:, ROW].set(jnp.nan)
def case(b, m):
    o = attention(qn, k, v, mask=m, backend=b, **kw(b))
    return {"row_nan": bool(jnp.isnan(o[:, ROW]).all()),
            "other_rows_finite": bool(jnp.isfinite(jnp.delete(o, ROW, axis=1)).all())}
for b in ("reference", "blocked", "pallas"):
    for name, m in (("no mask", None), ("causal", causal())):
        attempt(f"{b} {name}", lambda: case(b, m))
""", "row 5 NaN, other rows finite", None),
    "blocked_empty": ("zero-length q or k with `blocked`", "q [1,q_len,2,8], k=v [1,k_len,2,8], tiles 16", """
def case(lq, lk):
    qq, kk = jnp.ones((1, lq, 2, 8)), jnp.ones((1, lk, 2, 8))
    o, vjp = jax.vjp(lambda q: attention(q, kk, kk, backend="blocked", block_q=16, block_k=16), qq)
    return {"shape": list(o.shape) == [1, lq, 2, 8], "zeros": bool((o == 0).all()),
            "dq_zeros": bool((vjp(jnp.ones_like(o))[0] == 0).all())}
for lq, lk in ((0, 16), (16, 0), (0, 0)):
    attempt(f"q_len={lq} k_len={lk}", lambda: case(lq, lk))
""", "shape kept, zeros, dq zeros", None),
    "int_qkv": ("integer q/k/v", "int32 q=k=v [1,16,2,8] to attention(backend=...) and to the backend functions",
                """
qi = jnp.ones((1, 16, 2, 8), jnp.int32)
attempt("attention(backend=reference)", lambda: str(attention(qi, qi, qi, backend="reference").dtype))
attempt("attention(backend=blocked)", lambda: str(attention(qi, qi, qi, backend="blocked").dtype))
attempt("reference_attention", lambda: str(reference_attention(qi, qi, qi).dtype))
attempt("blocked_attention", lambda: str(blocked_attention(qi, qi, qi).dtype))
""", None, r"int32"),
}


def attention_row(row_id, out):
    fault, injection, code, passing, needle = ATTENTION[row_id]
    proc = run([PY, "-c", PRELUDE + code + "print(json.dumps(res))"])
    if proc.returncode != 0:
        raise RuntimeError(f"snippet failed (rc={proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    good = {name: all(r.values()) if isinstance(r, dict) else r.startswith("ValueError") for name, r in res.items()}
    groups = {}  # Cases with the same outcome share a cell.
    for name, r in res.items():
        groups.setdefault(passing if passing and good[name] else str(r), []).append(name)
    text = "; ".join(f"{', '.join(ns)}: {t[:170] + ('...' if len(t) > 170 else '')}" for t, ns in groups.items())
    row = Row(row_id, fault, injection, "python snippet (code in the JSON)", text, details={"cases": res, "code": code})
    out.append(judge(row, list(good.items()), [(needle, r) for r in res.values()] if needle else None))


# ------------------------------------------------------------------------------------ data, flags, processes
def row_4(out):
    given = os.path.join(ROOT, "fm_incomplete")
    os.makedirs(given)
    for f in glob.glob(os.path.join(FASHION, "t10k-*")):
        shutil.copy(f, given)
    extra = ["--config.data.name=fashion_mnist", f"--config.data.data_dir={given}", "--config.data.eval_split=test",
             "--config.data.image_size=28"]
    for sub, env in (("4a", {"MASKJAX_FASHION_MNIST_DIR": FASHION}), ("4b", {})):
        w = os.path.join(ROOT, f"r{sub}")
        proc = cli(w, *extra, env=env)
        how = f"MASKJAX_FASHION_MNIST_DIR={FASHION} (complete)" if env else "no MASKJAX_FASHION_MNIST_DIR"
        row = Row(sub, "data_dir lacks the train files", f"data_dir=$TMP/fm_incomplete holds only t10k-*; {how}",
                  ("MASKJAX_FASHION_MNIST_DIR=... " if env else "") + shown(proc.args, w), **report(proc, w))
        out.append(judge(row, [("rc=1", proc.returncode == 1), ("W not created", not os.path.exists(w))],
                         [(re.escape(f"'{given}' (data_dir"), proc.stderr), ("train-images", proc.stderr)]))


def flag_row(out, row_id, fault, injection, extra, needles):
    """A run the flags or config stop before any compute: exit 1, the workdir never created."""
    w = os.path.join(ROOT, f"r{row_id}")
    start = time.time()
    proc = cli(w, *extra)
    row = Row(row_id, fault, injection, shown(proc.args, w), **report(proc, w))
    row.outcome += f" (after {time.time() - start:.0f} s)"
    out.append(judge(row, [("rc=1", proc.returncode == 1), ("W not created", not os.path.exists(w))],
                     [(re.escape(n), proc.stderr) for n in needles]))


def row_coordinator(out):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flag_row(out, "coordinator", "coordinator whose peers never join", f"free port {port} (PORT), no process 1",
             ["--num_processes=2", "--process_id=0", f"--coordinator_address=127.0.0.1:{port}",
              "--config.distributed_timeout=5"], ["waited 5 s (config.distributed_timeout)"])
    out[-1].command = out[-1].command.replace(str(port), "PORT")


def start_long(w):
    """A LONG run, returned once metrics.jsonl has 3 train steps."""
    proc = subprocess.Popen(cli_argv(w, *LONG), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(logged(w, "train/loss")) < 3:
        time.sleep(0.2)
    if proc.poll() is not None or len(logged(w, "train/loss")) < 3:
        proc.kill()
        raise RuntimeError(f"the long run did not start training (rc={proc.wait()})")
    return proc


def stop(proc, signum) -> subprocess.CompletedProcess:
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def row_8(out):
    w = os.path.join(ROOT, "r8")
    first = start_long(w)
    try:
        second = cli(w, *LONG)
        lock = json.load(open(os.path.join(w, "run.lock")))
        row = Row("8a", "second run on a workdir in use", "run 1 = TINY + total_steps=100000, checkpoint_every=1000, "
                  "training (3 lines in metrics.jsonl)", shown(second.args, w), **report(second, w))
        out.append(judge(row, [("rc=1", second.returncode == 1), ("lock still run 1's", lock.get("pid") == first.pid),
                               ("one start in W/history.jsonl", len(history(w, "start")) == 1)],
                         [(f"PID {first.pid} on host {re.escape(socket.gethostname())}", second.stderr)]))
    finally:
        ended = stop(first, signal.SIGTERM)
    row = Row("8b", "SIGTERM to the training run", "kill -TERM <run 1 of 8a>", "(run 1 of 8a)",
              **report(ended, w, r"^SIGTERM", r"^Stopped|^Error"))
    out.append(judge(row, [("rc=143", ended.returncode == 143), ("checkpoint at the last logged step",
                                                          steps(w) == logged(w, "train/loss")[-1:]),
                           ("lock released", not os.path.exists(os.path.join(w, "run.lock")))],
                     [("Stopped by SIGTERM at step", ended.stdout)]))


def row_ctrl_c(out):
    w = os.path.join(ROOT, "rctrlc")
    ended = stop(start_long(w), signal.SIGINT)
    row = Row("ctrl_c", "Ctrl-C while training", "kill -INT <run> once metrics.jsonl has 3 train steps",
              shown(ended.args, w), **report(ended, w, r"^SIGINT", r"^Stopped|^Error|Traceback"))
    out.append(judge(row, [("rc=130", ended.returncode == 130),
                           ("checkpoint at the last logged step", steps(w) == logged(w, "train/loss")[-1:])],
                     [("Stopped by SIGINT at step", ended.stdout)]))


SIGTERM_AT_LAST = """
import os, signal, sys
from maskjax.train import trainer
make = trainer.Trainer._make_train_step
def patched(self):
    step_fn = make(self)
    def wrapped(state, batch):
        state, metrics = step_fn(state, batch)
        if int(state.step) == 8:
            os.kill(os.getpid(), signal.SIGTERM)
        return state, metrics
    return wrapped
trainer.Trainer._make_train_step = patched
sys.argv = ["maskjax"] + sys.argv[1:]
from maskjax.main import run
run()
"""


def row_sigterm_last(out):
    w = os.path.join(ROOT, "rsiglast")
    proc = run([PY, "-c", SIGTERM_AT_LAST, f"--workdir={w}", *TINY])
    row = Row("sigterm_last", "SIGTERM at the last step", "train step wrapped to send SIGTERM to its own process "
              "right after step 8", "python -c '<wrap the train step; maskjax.main.run()>' --workdir=W <TINY flags>",
              **report(proc, w, r"^SIGTERM", r"^Finished|^Stopped|^Error"))
    out.append(judge(row, [("rc=0", proc.returncode == 0), ("final eval at 8, once", logged(w, "eval/loss") == [8]),
                           ("checkpoints 4, 8", steps(w) == [4, 8])],
                     [("SIGTERM arrived at the last step; the final evaluation ran", proc.stdout)]))


def row_nan_loss(out):
    w = os.path.join(ROOT, "rnan")
    proc = cli(w, "--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=0")
    row = Row("nan_loss", "NaN loss before the first checkpoint", "learning rate 1e30 without warm-up: loss NaN at "
              "step 2, first checkpoint due at 4", shown(proc.args, w), **report(proc, w))
    out.append(judge(row, [("rc=1", proc.returncode == 1), ("no checkpoint", steps(w) == []),
                           ("step 1 logged", logged(w, "train/loss") == [1])],
                     [("No checkpoint was saved", proc.stderr), ("at step 2", proc.stderr)]))


# ------------------------------------------------------------------------------------ checkpoints and resumes
def damage_row(out, sub, fault, inject, describe, regex):
    """Damage checkpoints/8 of a finished run and rerun: expect a warning, step 8 moved aside whole, resumed from
    step 4. `regex`: what maskjax's warning should name (the array or file at fault)."""
    w = Base.copy(f"r{sub}")
    detail = inject(os.path.join(w, "checkpoints", "8"))
    damaged = contents(os.path.join(w, "checkpoints", "8"))
    proc = cli(w)
    row = Row(sub, fault, describe + (f" ({rel(detail, w)})" if detail else ""), shown(proc.args, w),
              **report(proc, w, r"^WARNING", r"^Resuming|^Error"))
    warning = "".join(x for x in proc.stderr.splitlines() if x.startswith("WARNING: checkpoint step 8"))
    out.append(judge(row, [
        ("rc=0", proc.returncode == 0),
        ("warning names step 8 and W/damaged_checkpoints/8-", re.search(r"W/damaged_checkpoints/8-", rel(warning, w))),
        ("step 8 kept whole in W/damaged_checkpoints/", moved_aside(w) == {8: damaged}),
        ("resumed from 4", [r["step"] for r in history(w, "resume")] == [4]), ("reached 8", steps(w) == [4, 8]),
        ("each train step logged once", logged(w, "train/loss") == list(range(1, 9)))],
        [(regex, warning)], names_needed=False))


def row_5(out):
    damage_row(out, "5", "bit-flipped latest checkpoint", flip, "XOR 0xFF over 400 bytes in the middle of the "
               "largest array file of checkpoints/8/state", r"(params|opt_state)/\S+: digest")


def row_10(out):
    def truncate(step_dir):
        path = largest_array_file(step_dir)
        size = os.path.getsize(path)
        os.truncate(path, size // 2)
        return f"{path}, {size} -> {size // 2} bytes"

    def empty(step_dir):
        for name in os.listdir(step_dir):
            target = os.path.join(step_dir, name)
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)

    def garbage(name):
        def inject(step_dir):
            with open(os.path.join(step_dir, name), "wb") as f:
                f.write(b"\xff\xfe not json \x00\x81")
        return inject
    damage_row(out, "10a", "truncated array file", truncate, "largest array file of checkpoints/8/state cut to "
               "half", r"(params|opt_state)/|/d/[0-9a-f]+")
    damage_row(out, "10b", "emptied step directory", empty, "every file and folder inside checkpoints/8/ deleted",
               r"checkpoint step 8")
    damage_row(out, "10c", "garbage state/_METADATA", garbage("state/_METADATA"), "checkpoints/8/state/_METADATA "
               ":= 17 bytes of non-JSON", r"state/_METADATA")
    damage_row(out, "10d", "garbage meta/metadata", garbage("meta/metadata"), "checkpoints/8/meta/metadata := 17 "
               "bytes of non-JSON", r"meta/metadata")
    w = Base.copy("r10e")
    for step in (4, 8):
        flip(os.path.join(w, "checkpoints", str(step)))
    damaged = {s: contents(os.path.join(w, "checkpoints", str(s))) for s in (4, 8)}
    metrics = open(os.path.join(w, "metrics.jsonl")).read()
    proc = cli(w)
    row = Row("10e", "every checkpoint damaged", "bit flips as in row 5 in checkpoints/4 and checkpoints/8",
              shown(proc.args, w), **report(proc, w, r"^Error"))
    out.append(judge(row, [("rc=1", proc.returncode == 1), ("no step left in checkpoints/", steps(w) == []),
                           ("4 and 8 kept whole in W/damaged_checkpoints/", moved_aside(w) == damaged),
                           ("metrics.jsonl unchanged", open(os.path.join(w, "metrics.jsonl")).read() == metrics)],
                     [(r"no intact checkpoint", proc.stderr), ("Nothing was deleted", proc.stderr),
                      (r"step 4 ->.*digest", proc.stderr), (r"step 8 ->.*digest", proc.stderr)]))
    proc = cli(w)  # The same command again, as a user (or a scheduler's requeue) would.
    row = Row("10f", "rerun after 10e", "none (the workdir as 10e left it)", shown(proc.args, w),
              **report(proc, w, r"^Error"))
    out.append(judge(row, [("rc=1", proc.returncode == 1),
                           ("4 and 8 still in W/damaged_checkpoints/", moved_aside(w) == damaged),
                           ("metrics.jsonl unchanged", open(os.path.join(w, "metrics.jsonl")).read() == metrics)],
                     [("damaged_checkpoints", proc.stderr), ("another --workdir", proc.stderr)]))


def row_tmp_dir(out):
    w = Base.copy("rtmp")
    leftover = os.path.join(w, "checkpoints", "12.orbax-checkpoint-tmp")
    os.makedirs(leftover)
    open(os.path.join(leftover, "partial"), "w").write("half a save")
    proc = cli(w)
    row = Row("tmp_dir", "temp directory of a save that never completed", "mkdir W/checkpoints/12.orbax-checkpoint-"
              "tmp (+ a file) in a finished run", shown(proc.args, w), **report(proc, w, r"^Removing|^Error|WARNING"))
    out.append(judge(row, [("rc=0", proc.returncode == 0), ("removed", not os.path.exists(leftover)),
                           ("checkpoints 4, 8", steps(w) == [4, 8]), ("eval at 8 once", logged(w, "eval/loss") == [8])],
                     [("12.orbax-checkpoint-tmp", proc.stderr + proc.stdout)]))


def row_dup_metrics(out):
    w = Base.copy("rdup")
    shutil.rmtree(os.path.join(w, "checkpoints", "8"))
    proc = cli(w)
    row = Row("dup_metrics", "metrics replayed after a resume", "finished run, rm -r W/checkpoints/8 (steps 5-8 and "
              "the final eval already in metrics.jsonl)", shown(proc.args, w), **report(proc, w, r"^Resuming|^Error"))
    out.append(judge(row, [("rc=0", proc.returncode == 0),
                           ("train steps 1..8 once", logged(w, "train/loss") == list(range(1, 9))),
                           ("eval at 8 once", logged(w, "eval/loss") == [8])]))


def refused_row(out, sub, fault, extra, needles):
    w = Base.copy(f"r{sub}")
    before, ckpts = snapshot(w), contents(os.path.join(w, "checkpoints"))
    proc = cli(w, *extra)
    row = Row(sub, fault, "finished run, rerun with " + " ".join(extra), shown(proc.args, w), **report(proc, w))
    out.append(judge(row, [("rc=1", proc.returncode == 1),
                           ("config.json, metrics, history unchanged", snapshot(w) == before),
                           ("checkpoints unchanged", contents(os.path.join(w, "checkpoints")) == ckpts)],
                     [(n, proc.stderr) for n in needles]))


def resumed_row(out, sub, fault, extra, final, needle, recorded):
    w = Base.copy(f"r{sub}")
    proc = cli(w, *extra)
    record = (history(w, "resume") or [{}])[-1]
    row = Row(sub, fault, "finished run, rerun with " + " ".join(extra), shown(proc.args, w),
              **report(proc, w, r"^WARNING", r"^Resuming|^Error"), details={"history_resume": record})
    out.append(judge(row, [("rc=0", proc.returncode == 0),
                           (f"reached step {final}", f"Finished at step {final}." in proc.stdout),
                           ("recorded in W/history.jsonl", recorded(record)),
                           ("each train step logged once", logged(w, "train/loss") == list(range(1, final + 1)))],
                     [(needle, proc.stderr)]))


def row_6(out):
    refused_row(out, "6a", "resume with another seed", ["--config.seed=1"], [r"seed: 0 in the checkpoint, 1 now"])
    refused_row(out, "6b", "resume with another batch size (runlocal: 32)", ["--config.batch_size=16"],
                [r"batch_size: 32 in the checkpoint, 16 now"])
    resumed_row(out, "6c", "resume with a longer run", ["--config.total_steps=12"], 12, r"total_steps 8 -> 12: the "
                r"learning rate", lambda r: r.get("changes") == {"total_steps": [8, 12]} and bool(r.get("notes")))
    resumed_row(out, "6d", "resume with another seed, forced", ["--config.seed=1", "--config.resume_policy=force"],
                8, r"seed 0 -> 1", lambda r: r.get("forced") == ["seed"] and r.get("changes", {}).get("seed") == [0, 1])


def row_9(out):
    extra = ["--config.model.width=64", "--config.model.num_heads=4"]
    refused_row(out, "9a", "resume with a wider model (mu/4: width 32, 2 heads)", extra,
                [r"model.width: -1 in the checkpoint, 64 now", r"model.num_heads: -1 in the checkpoint, 4 now"])
    refused_row(out, "9b", "same, forced", extra + ["--config.resume_policy=force"],
                [r"params/\S+: checkpoint \([^)]*32\) float32 vs model \([^)]*64\)"])


ROWS = {name: (lambda out, name=name: attention_row(name, out)) for name in ("1", "2", "3")}
ROWS.update({
    "4": row_4, "5": row_5, "6": row_6,
    "7": lambda out: flag_row(out, "7", "multi-process flags without coordinator", "--num_processes=2 --process_id=1",
                              ["--num_processes=2", "--process_id=1"],
                              ["--num_processes=2 needs --coordinator_address"]),
    "8": row_8, "9": row_9, "10": row_10,
    "11": lambda out: flag_row(out, "11", "eval_examples larger than the split", "--config.evals.eval.examples=100000 "
                               "(the validation split has 5000)", ["--config.evals.eval.examples=100000"],
                               ["config.evals.eval.examples=100000 exceeds"]),
    "dup_metrics": row_dup_metrics, "blocked_empty": lambda out: attention_row("blocked_empty", out),
    "int_qkv": lambda out: attention_row("int_qkv", out), "nan_loss": row_nan_loss, "sigterm_last": row_sigterm_last,
    "ctrl_c": row_ctrl_c, "coordinator": row_coordinator, "tmp_dir": row_tmp_dir})


# ------------------------------------------------------------------------------------------------- the report
NOTES = """Rows 1-3, `blocked_empty` and `int_qkv` run `maskjax.attention` on CPU (pallas in interpret mode). Row 6b
uses batch size 16 because the runlocal config already trains at 32. Row 9 uses width 64 with 4 heads (mu/4 has
width 32 and 2 heads), so both keys change. In row 8 the second run uses the same command as the first.
`sigterm_last` wraps the train step (as tests/train/test_reliability.py does) and then runs `maskjax.main.run()`
with the TINY flags. For the damaged-checkpoint rows (5, 10a-d) \"names the fault\" asks whether the warning names
the array or file at fault (naming the step and where it was moved is one of the checks); in `tmp_dir` whether the
output mentions the removed directory. Neither decides the verdict."""


def write(rows, meta):
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["# No silent failures (issue 13): what maskjax does now", "", f"`{meta['command']}`", "",
             f"Date: {meta['date']}. maskjax commit `{meta['commit']}`"
             + (f" with uncommitted changes in {', '.join(meta['dirty'])}." if meta["dirty"] else "."), "",
             f"`TINY` = `python -m maskjax.main --workdir=W {' '.join(TINY)}`. W: the row's workdir, a copy of one "
             "finished TINY run (checkpoints 4 and 8) for the checkpoint and resume rows; `$TMP`: the script's "
             "temporary directory. \"names the fault\": the output contains the key / path / value at fault (the "
             "regexes are in the JSON). \"nothing lost?\": the checks the script asserts.", "",
             "| # | fault | injection | command | maskjax now | names the fault | nothing lost? | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(x) for x in (
            r.id, r.fault, r.injection, f"`{r.command}`", r.outcome,
            {True: "yes", False: "**no**", None: "—"}[r.names], r.check, "PASS" if r.ok else "**FAIL**")) + " |")
    lines += ["", f"{sum(r.ok for r in rows)} of {len(rows)} rows pass.", "", NOTES]
    with open(os.path.join(RESULTS, "reliability.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, "reliability.json"), "w") as f:
        json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)


def main():
    global ROOT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="", help=f"comma-separated subset of: {', '.join(ROWS)}")
    args = parser.parse_args()
    chosen = [r for r in args.rows.split(",") if r] or list(ROWS)
    if set(chosen) - set(ROWS):
        parser.error(f"unknown rows {sorted(set(chosen) - set(ROWS))}; valid: {', '.join(ROWS)}")
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa
    meta = {"command": "python experiments/reliability.py" + (f" --rows {args.rows}" if args.rows else ""),
            "date": datetime.date.today().isoformat(), "commit": git("rev-parse", "--short=12", "HEAD"),
            "dirty": sorted({os.path.dirname(x[3:]) for x in git("status", "--porcelain", "maskjax").splitlines()})}
    ROOT = tempfile.mkdtemp(prefix="maskjax_reliability_")
    start, rows = time.time(), []
    try:
        for name in chosen:
            t0, done = time.time(), len(rows)
            try:
                ROWS[name](rows)
            except Exception as error:  # noqa: BLE001 - a broken row is reported, the others still run
                rows.append(Row(name, f"(row {name} did not complete)", "", "", f"{type(error).__name__}: {error}"))
            for r in rows[done:]:
                print(f"{r.id:>14} {'PASS' if r.ok else 'FAIL'} {r.outcome[:100]}", flush=True)
            print(f"{'':>14} ({time.time() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)
    meta["seconds"] = round(time.time() - start)
    write(rows, meta)
    failed = [r.id for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows pass" + (f"; FAIL: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
