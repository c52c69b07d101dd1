"""One tqdm-style progress line per pass in the logs, at a bounded rate.

Replicate's log view reads tqdm's line format (" 50%|█████     | 14/28 [00:03<00:03,  4.20it/s]"), and a
multi-pass request (main pass, hires pass, upscale tiles, detailer crops) should show each pass advance. tqdm
itself stays off in every pipeline (utils._loaded_model, LoadedModel.pipeline, control.controlled_pipeline): its
carriage-return redraws become one log line each, dozens per pass. Here a pass writes a line only when it has
advanced by at least `every` of its total since the last line (10 %: at most 10 lines a pass) and at least
`min_seconds` have passed (so a fast GPU pass writes two or three lines), and always its last one.

    progress = Progress("hires pass")               # the total can come later, with the first update
    pipe(..., callback_on_step_end=progress.step_callback())
    with Progress("upscale tiles", total=len(tiles)) as tiles_done:
        for tile in tiles:
            ...
            tiles_done.update()

A line costs one string format and one write; nothing is synchronised with the accelerator.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional, TextIO

BAR_WIDTH = 10


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


def format_line(label: str, done: int, total: int, elapsed: float) -> str:
    """tqdm's default line: `label:  50%|█████     | 14/28 [00:03<00:03,  4.20it/s]`."""
    fraction = done / total if total else 1.0
    filled = int(fraction * BAR_WIDTH)
    bar = "█" * filled + " " * (BAR_WIDTH - filled)
    rate = done / elapsed if elapsed > 0 else 0.0
    remaining = (total - done) / rate if rate > 0 else 0.0
    speed = f"{rate:5.2f}it/s" if rate >= 1 or rate == 0 else f"{1 / rate:5.2f}s/it"
    return f"{label}: {fraction * 100:3.0f}%|{bar}| {done}/{total} [{_clock(elapsed)}<{_clock(remaining)}, {speed}]"


class Progress:
    """Progress of one pass (denoising steps, tiles, crops), written as bounded tqdm-style lines."""

    def __init__(self, label: str, total: Optional[int] = None, *, every: float = 0.1, min_seconds: float = 1.0,
                 write: Optional[Callable[[str], None]] = None, clock: Callable[[], float] = time.monotonic,
                 stream: Optional[TextIO] = None) -> None:
        self.label = label
        self.total = total
        self.every = every
        self.min_seconds = min_seconds
        self._write = write or (lambda line: print(line, file=stream or sys.stdout, flush=True))
        self._clock = clock
        self.started = clock()
        self.done = 0
        self._last_done = 0
        self._last_time = self.started
        self.lines = 0  # written so far (tests count them)

    def update(self, n: int = 1) -> None:
        """`n` more units done."""
        self.set(self.done + n)

    def set(self, done: int, total: Optional[int] = None) -> None:
        """`done` units of `total` (or of the total given before) are done; writes a line when due."""
        if total is not None:
            self.total = total
        if self.total is None or self.total <= 0:
            return
        self.done = min(done, self.total)
        finished = self.done >= self.total
        step = max(1, math.ceil(self.total * self.every))
        now = self._clock()
        if finished and self._last_done < self.total or \
                self.done - self._last_done >= step and now - self._last_time >= self.min_seconds:
            self._write(format_line(self.label, self.done, self.total, now - self.started))
            self.lines += 1
            self._last_done, self._last_time = self.done, now

    def step_callback(self) -> Callable:
        """A diffusers `callback_on_step_end`: step i of the pipeline's own `num_timesteps` (what strength, the
        scheduler's order and the hires/img2img start leave of num_inference_steps)."""

        def on_step_end(pipe, i: int, t, callback_kwargs: dict) -> dict:
            self.set(i + 1, int(getattr(pipe, "num_timesteps", 0) or 0) or None)
            return callback_kwargs

        return on_step_end

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        return None
