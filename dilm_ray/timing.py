"""Wall time and invocation counts per stage, kept in ``timing.json`` across resumed invocations."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator


class StageTimer:
    """``{"seconds": {stage: s}, "runs": {stage: n}}`` in ``path``; each ``span`` adds to both.

    ``runs`` counts how often a stage actually executed (a skipped stage adds nothing), so a
    resumed pipeline can be checked for work it did not repeat.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        raw = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        if raw and "seconds" not in raw:  # the older flat {stage: seconds} form
            raw = {"seconds": raw, "runs": {}}
        self.seconds: dict[str, float] = raw.get("seconds", {})
        self.runs: dict[str, int] = raw.get("runs", {})

    @contextlib.contextmanager
    def span(self, name: str, count: bool = True) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:  # an interrupted stage's time counts too
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if count:
                self.runs[name] = self.runs.get(name, 0) + 1
            self.save()

    def add_runs(self, name: str, n: int) -> None:
        self.runs[name] = self.runs.get(name, 0) + n
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"seconds": self.seconds, "runs": self.runs}, indent=1) + "\n")

    def markdown(self) -> str:
        """Wall time and count per stage; counts kept without a time (evaluation runs) follow."""
        lines = ["| stage | wall time (min) | invocations |", "|---|---|---|"]
        lines += [f"| {name} | {sec / 60:.1f} | {self.runs.get(name, '')} |" for name, sec in self.seconds.items()]
        lines += [f"| {name} | | {n} |" for name, n in self.runs.items() if name not in self.seconds]
        return "\n".join(lines)
