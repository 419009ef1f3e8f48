"""One progress line on the driver for a Ray Train run: step/total, img/s, ETA and the last losses.

Ray Train calls ``after_report`` on its controller (another process), once per report with
every worker's metrics; the callback forwards rank 0's to a small Ray queue and a thread in the
driver draws them with tqdm. One bar, not one line per worker; it never slows training (a full
queue drops the update).
"""
from __future__ import annotations

import threading

from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Full, Queue
from tqdm import tqdm

from gan.report import Report

SHOWN = ("d_loss", "g_loss", "fid")


class Progress(UserCallback):
    def __init__(self, total: int, start: int = 0, desc: str = "train"):
        self.queue = Queue(maxsize=64, actor_options={"num_cpus": 0})
        self.total, self.start, self.desc = total, start, desc
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict:  # what travels to the controller: the queue, not the thread
        return {"queue": self.queue, "total": self.total, "start": self.start, "desc": self.desc, "_thread": None}

    def after_report(self, run_context, metrics, checkpoint):  # on the Train controller
        try:
            self.queue.put_nowait(dict(metrics[0]))
        except Full:
            pass

    def __enter__(self) -> "Progress":
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._draw, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.queue.shutdown()

    def _draw(self) -> None:
        scores: dict[str, float] = {}  # the latest evaluation stays on the line until the next one
        with tqdm(total=self.total, initial=self.start, desc=self.desc, unit="step", dynamic_ncols=True) as bar:
            while not self._stop.is_set() or not self.queue.empty():
                try:
                    r = Report.from_summary(self.queue.get(timeout=0.5))
                except Exception:  # queue.Empty, or the queue actor already gone
                    continue
                if r.step > bar.n:
                    bar.update(r.step - bar.n)
                scores |= r.scores
                m = {**r.metrics, **scores}
                post = {k: f"{m[k]:.3g}" for k in SHOWN if k in m}
                if "img_per_s" in m:
                    post["img/s"] = f"{m['img_per_s']:.0f}"
                if post:
                    bar.set_postfix(post, refresh=False)
