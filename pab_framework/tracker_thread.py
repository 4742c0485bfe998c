"""One tracker of `runtime.loggers` on a thread of its own (`pab_framework.tracking` drives it):
its hooks run there in order, never on the training loop's thread; an epoch's figures wait up to
`every_s` to go with the next ones; a hook that raises, or a tracker that lags past `wait_s`,
gets one warning."""
from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from .specification import LoggerCall


@dataclass(frozen=True)
class Held:
    """An epoch on its way to a tracker, and the stage whose trackers.json notes it once sent."""

    stage: Any  # tracking's record of the stage: `note(key, **entry)` writes its trackers.json
    epoch: Any  # a tracking.Epoch


_SEND = object()  # the worker's own: send what it holds


class TrackerThread:
    """One entry of runtime.loggers, on a thread of its own that runs its hooks in order. Epochs
    that end within `every_s` of the last sending are held and go together (a stage's end, or any
    other hook, sends what is held first)."""

    def __init__(self, key: str, index: int, call: "LoggerCall", warn: Callable[[str], None]):
        self.key, self.call, self.plugin, self.params = key, call, call.plugin, call.params
        self.where = f"tracker {call.name} (runtime.loggers[{index}])"
        self._warn = warn
        self.warned = False
        self.broken = False  # a hook raised: left out from then on
        self.late = False  # did not catch up in time once: not waited for again
        self.conn: Any = None  # what connect returned
        self.handle: Any = None  # the stage's tracker run, once started
        self.through = 0  # the last epoch of the stage that it has (a re-run epoch is not sent twice)
        self.sent_at = -math.inf  # when epochs last went to it (time.monotonic)
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name=f"pab-tracker-{key}", daemon=True)
        self.thread.start()

    def put(self, what: str, fn: Callable, *args) -> None:
        if not self.broken:
            self.jobs.put((what, fn, args))

    def put_epoch(self, stage: Any, epoch: Any) -> None:
        if not self.broken:
            self.jobs.put(Held(stage, epoch))

    def _work(self) -> None:
        held: list[Held] = []
        while True:
            due = self.sent_at + self.call.every_s
            try:
                job = self.jobs.get(timeout=max(0.0, due - time.monotonic()) if held else None)
            except queue.Empty:
                job = _SEND
            if isinstance(job, Held):
                held.append(job)
                if time.monotonic() < due:
                    continue
                job = _SEND
            if held:
                n = [h.epoch.epoch for h in held]
                self._do(f"logging epoch{f's {n[0]}-{n[-1]}' if len(n) > 1 else f' {n[0]}'}", self._send, held)
                held = []
            if job is None:
                return
            if job is not _SEND:
                self._do(*job[:2], *job[2])

    def _send(self, held: list[Held]) -> None:
        self.plugin.log_epochs(self.params, self.handle, [h.epoch for h in held])
        self.sent_at = time.monotonic()
        held[-1].stage.note(self.key, through=held[-1].epoch.epoch)

    def _do(self, what: str, fn: Callable, *args) -> None:
        if self.broken and what:  # (a marker of `wait`, whose `what` is empty, always runs)
            return
        try:
            fn(*args)
        except BaseException as e:  # third-party code: one warning, then the run goes on without it (no Ctrl-C reaches this thread)
            self.broken = True
            first = (str(e).strip().splitlines() or [""])[0][:300]
            self.warn(f"{what} failed ({type(e).__name__}{': ' + first if first else ''}); the run goes on without it")

    def warn(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            self._warn(f"{self.where}: {message} (metrics.jsonl keeps every figure)")

    def wait(self, doing: str) -> None:
        """Until the work queued so far is done, `wait_s` at most; past that, one warning and no more waiting."""
        if self.late or not self.thread.is_alive():
            return
        done = threading.Event()
        self.jobs.put(("", done.set, ()))
        if not done.wait(self.call.wait_s):
            self.late = True
            self.warn(f"still {doing} after {self.call.wait_s:g} s (its wait_s); the run goes on without waiting for it")

    def close(self) -> None:
        self.jobs.put(None)
        if not self.late:
            self.thread.join(self.call.wait_s)
