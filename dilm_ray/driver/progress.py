"""One live progress bar per stage on the driver, fed by the Ray Train workers.

Workers print to their own log files (``RunLayout.worker_log``) and Ray does not forward worker
output to the terminal (``ray_env.ensure_ray``): forwarded tqdm redraws came out as hundreds of
empty ``(RayTrainWorker pid=...)`` lines. Instead rank 0 sends its step and its metric lines to a
small actor, ``ProgressBoard``, with fire-and-forget calls (well under a millisecond each, against
steps of a second), and the driver polls it twice a second and draws the bar.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

POLL_SECONDS = 0.5


class ProgressBoard:
    """What the driver draws: the latest step, the latest bar postfix, and metric lines not yet printed.
    Runs as a Ray actor (``board()``); its methods are what workers and driver call."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.postfix: dict[str, str] = {}
        self.lines: list[str] = []

    def update(self, step: int, postfix: dict[str, str] | None = None) -> None:
        self.step = step
        if postfix:
            self.postfix = postfix

    def write(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> tuple[int | None, dict[str, str], list[str]]:
        """The state, emptying the lines."""
        lines, self.lines = self.lines, []
        return self.step, self.postfix, lines


def board():
    """A new ``ProgressBoard`` actor (0 CPUs) on the driver's own node: placed anywhere, it may
    land on a worker node, and losing that node would end the stage it only draws."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ProgressBoard).options(scheduling_strategy=here).remote()


class BoardLogger:
    """A ``MetricLogger`` for rank 0 of a Ray Train worker group: each logged step becomes one
    ``[stage step] key=value`` line on the driver and the bar's postfix."""

    def __init__(self, handle: Any, prefix: str, enabled: bool = True):
        self.handle, self.prefix, self.enabled = handle, prefix, enabled and handle is not None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            from dilm_ray.tracking.loggers import metric_line

            self.handle.write.remote(metric_line(self.prefix, step, metrics))


@contextmanager
def follow(handle: Any, desc: str, total: int) -> Iterator[None]:
    """Draw ``handle``'s progress as a tqdm bar on the driver while the block runs (a daemon
    thread polls every ``POLL_SECONDS``, each poll bounded by a timeout); metric lines print
    above the bar. The actor is killed at the end."""
    import ray
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
    done = threading.Event()
    pending: list = []  # a take() not answered in time: waited on again, as its lines are taken off the board

    def draw() -> None:
        if not pending:
            pending.append(handle.take.remote())
        step, postfix, lines = ray.get(pending[0], timeout=POLL_SECONDS * 4)
        pending.clear()
        for line in lines:
            bar.write(line)
        if step is not None and step != bar.n:
            bar.update(step - bar.n)
        if postfix:
            bar.set_postfix(postfix, refresh=False)
        bar.refresh()

    def loop() -> None:
        while not done.wait(POLL_SECONDS):
            try:
                draw()
            except ray.exceptions.GetTimeoutError:
                # a busy machine (2 cores, the Train worker using both) can delay an answer past
                # the timeout: draw on. Ending here left a stage-2 bar at 0/60 and its metric lines
                # unprinted for the rest of the stage.
                continue
            except Exception:  # the actor or Ray going away ends the drawing, never the stage
                return

    thread = threading.Thread(target=loop, daemon=True, name=f"progress-{desc}")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=POLL_SECONDS * 8)  # a stuck poll must not hold up Ctrl-C
        try:
            draw()
            ray.kill(handle)
        except Exception:  # Ray already gone: the stage's own outcome is what the caller sees
            pass
        bar.close()
