"""Long-running jobs (fine-tunes): one at a time on a worker thread, their state in JSON files that outlive
the process.

Every state change is written atomically to ``<data_dir>/jobs/<job_id>.json``. A job that was queued or
running when its process stopped is marked failed when the runner next opens the directory: a job is never
left looking half-done, and what it produced is all-or-nothing by itself (a fine-tune registers its backbone
only once it is complete).
"""
from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .durable import write_atomic
from .errors import EmbedderError, NotFoundError

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
Work = Callable[["Job", threading.Event, Callable[[dict[str, Any]], None]], dict[str, Any]]


class JobCancelled(EmbedderError):
    """Raised by a job's work when it notices its cancel event."""


@dataclass
class Job:
    job_id: str
    kind: str
    state: str  # queued, running, finished, failed, cancelled
    params: dict[str, Any]
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)


class JobRunner:
    """Runs submitted work one job at a time; ``get``/``cancel``/``list`` from any thread."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._queue: queue.Queue[tuple[Job, Work] | None] = queue.Queue()
        for path in sorted(self.root.glob("*.json")):
            try:
                job = Job(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError) as e:
                log.warning("skipping unreadable job file %s: %s", path, e)
                continue
            if job.state in ACTIVE:
                job.state, job.error = "failed", "interrupted: the server stopped while it ran; submit it again"
                job.updated = time.time()
                self._write(job)
            self._jobs[job.job_id] = job
        self._worker = threading.Thread(target=self._work, name="embedder-jobs", daemon=True)
        self._worker.start()

    def submit(self, kind: str, params: dict[str, Any], work: Work) -> Job:
        job = Job(f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}", kind, "queued", params)
        with self._lock:
            self._jobs[job.job_id] = job
            self._cancel[job.job_id] = threading.Event()
            self._write(job)
        self._queue.put((job, work))
        return self.get(job.job_id)

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise unknown_job(job_id)
            return Job(**asdict(job))  # a copy: the worker keeps updating the original

    def cancel(self, job_id: str) -> Job:
        """Ask a queued or running job to stop (it stops between batches); finished jobs are left as they are."""
        self.get(job_id)
        with self._lock:
            event = self._cancel.get(job_id)
        if event is not None:
            event.set()
        return self.get(job_id)

    def list(self) -> list[Job]:
        with self._lock:
            return [Job(**asdict(j)) for j in sorted(self._jobs.values(), key=lambda j: j.created)]

    def close(self, timeout: float | None = None) -> None:
        """Cancel what runs or waits, and stop the worker."""
        with self._lock:
            for event in self._cancel.values():
                event.set()
        self._queue.put(None)
        self._worker.join(timeout)

    def _work(self) -> None:
        while (entry := self._queue.get()) is not None:
            job, work = entry
            cancel = self._cancel[job.job_id]
            if cancel.is_set():
                self._update(job, state="cancelled", error="cancelled before it started")
                continue
            self._update(job, state="running")
            try:
                result = work(job, cancel, lambda progress: self._update(job, progress=progress))
            except JobCancelled as e:
                self._update(job, state="cancelled", error=str(e))
            except EmbedderError as e:  # the job's input was wrong: its message says what to do
                self._update(job, state="failed", error=str(e))
            except Exception as e:  # never let one job take the worker down
                log.exception("job %s failed", job.job_id)
                self._update(job, state="failed", error=f"server fault ({type(e).__name__}; the server's log has "
                                                         "the details)")
            else:
                self._update(job, state="finished", result=result)
            finally:
                with self._lock:
                    self._cancel.pop(job.job_id, None)

    def _update(self, job: Job, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(job, name, value)
            job.updated = time.time()
            self._write(job)

    def _write(self, job: Job) -> None:
        write_atomic(self.root / f"{job.job_id}.json", json.dumps(asdict(job), indent=2).encode())


def unknown_job(job_id: str) -> NotFoundError:
    """The answer about a job there is none of (also to a key that may not see the job: it learns nothing)."""
    return NotFoundError(f"no job {job_id[:100]!r}; job ids come from FineTune, and a job is kept by the server that "
                         "runs it (with several replicas, ask the one that started it)")
