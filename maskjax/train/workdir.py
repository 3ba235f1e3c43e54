"""One workdir, one run: a lock file naming its holder, and the workdir's history of starts, resumes and repairs.

The lock `<workdir>/run.lock` holds JSON {host, pid, pid_start, started, argv}. A live holder makes a second run
stop with its name. A stale lock is taken over with a warning: on the same host when its PID is gone (or was
reused by another process), on another host when it was not refreshed for `stale_seconds` (the holder refreshes
its modification time from a background thread).
"""

import json
import os
import socket
import sys
import threading
import time
from typing import Optional

LOCK_NAME = "run.lock"
HISTORY_NAME = "history.jsonl"


class WorkdirBusyError(RuntimeError):
    """Another live run holds the workdir's lock."""


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (Linux /proc), to tell a reused PID from the original; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Exists, owned by someone else.
    return True


def atomic_write(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename, so readers never see half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class WorkdirLock:
    """`acquire()` or raise WorkdirBusyError naming the holder; `release()` removes the lock if it is still ours."""

    def __init__(self, workdir: str, stale_seconds: float = 600.0):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self.stale_seconds = float(stale_seconds)
        self._record: Optional[dict] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _own_record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(sys.orig_argv)}

    def _read(self) -> tuple[Optional[dict], float, str]:
        """(holder record or None if unreadable, age in seconds since the last refresh, raw text)."""
        age = time.time() - os.path.getmtime(self.path)
        with open(self.path, errors="replace") as f:
            raw = f.read()
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        return (record if isinstance(record, dict) else None), age, raw

    def stale_reason(self, record: Optional[dict], age: float) -> str:
        """Why the lock of `record` is stale ('' = its holder may be alive)."""
        if record is None:
            return f"the lock file is unreadable and {age:.0f} s old" if age > self.stale_seconds else ""
        if record.get("host") == socket.gethostname():
            pid = int(record.get("pid", -1))
            if not _pid_alive(pid):
                return f"process {pid} on this host is gone"
            recorded, current = record.get("pid_start"), _process_start(pid)
            if recorded and current and recorded != current:
                return f"PID {pid} now belongs to another process"
            return ""
        if age > self.stale_seconds:
            return f"it was last refreshed {age:.0f} s ago (> {self.stale_seconds:.0f} s, config.lock_stale_seconds)"
        return ""

    def live_holder(self) -> Optional[str]:
        """A description of the run holding this lock if it may be alive, else None (no lock, or a stale one)."""
        try:
            holder, age, _ = self._read()
        except FileNotFoundError:
            return None
        return None if self.stale_reason(holder, age) else describe(holder)

    def acquire(self) -> Optional[str]:
        """Takes the lock; returns a warning when a stale lock was taken over, else None."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        record = self._own_record()
        warning = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder, age, raw = self._read()
                except FileNotFoundError:
                    continue  # Released between our attempts.
                why = self.stale_reason(holder, age)
                if not why:
                    raise WorkdirBusyError(
                        f"workdir {os.path.dirname(self.path)} is in use by {describe(holder)} (lock {self.path}, "
                        f"refreshed {age:.0f} s ago). Wait for that run to end, or use another --workdir.")
                # Rename, then check we moved the lock we judged: two runs racing for one stale lock cannot both win.
                aside = f"{self.path}.stale-{os.getpid()}"
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                with open(aside, errors="replace") as f:
                    moved = f.read()
                if moved != raw:
                    os.rename(aside, self.path)
                    continue
                os.remove(aside)
                warning = f"Took over the stale lock of {describe(holder)} on {os.path.dirname(self.path)}: {why}."
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self._record = record
            self._start_heartbeat()
            return warning
        raise WorkdirBusyError(f"could not take the lock {self.path}: other runs keep taking it")

    def _start_heartbeat(self) -> None:
        interval = max(1.0, min(60.0, self.stale_seconds / 4))

        def beat():
            while not self._stop.wait(interval):
                try:
                    os.utime(self.path)
                except OSError:
                    pass
        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="maskjax-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if self._record is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder, _, _ = self._read()
            if holder == self._record:
                os.remove(self.path)
        except OSError:
            pass
        self._record = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def describe(record: Optional[dict]) -> str:
    """'PID 123 on host h (started 2026-..., `python -m maskjax.main ...`)' of a lock record."""
    if record is None:
        return "an unknown run (unreadable lock)"
    argv = " ".join(record.get("argv", []))[:200]
    return (f"PID {record.get('pid')} on host {record.get('host')} (started {record.get('started')}"
            f"{', `' + argv + '`' if argv else ''})")


def append_history(workdir: str, event: str, **fields) -> None:
    """One JSON line in `<workdir>/history.jsonl`: what happened to the workdir, when, by which process."""
    record = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
              "pid": os.getpid(), **fields}
    with open(os.path.join(workdir, HISTORY_NAME), "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
