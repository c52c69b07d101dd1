"""The real Predictor with a pause point inside LoRA merging, so that a test can land a real Cog cancel mid-merge.

Merging a LoRA into the tiny test model takes 10-60 ms, far too short to aim a cancel at from outside. Served as
`COG_PREDICT_TYPE_STUB=test_folder/cancel_probe.py:Predictor`, this subclass changes nothing until armed: when the
file $CANCEL_PROBE_DIR/pause-merge exists (holding a layer count N), the next merge writes at least N layers into
the live weights (same-shape layers are written in batches), removes the file, prints "cancel probe: paused mid-merge
after M layers" (M >= N) (which reaches the server log as
the prediction's output) and waits there until the cancel's CancelationException arrives (at most 60 s, then it
goes on). The wait sleeps in short steps because Cog delivers the exception between Python bytecodes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import predict

PAUSE_FILE = "pause-merge"
MAX_PAUSE_SECONDS = 60.0


class Predictor(predict.Predictor):
    def setup(self) -> None:
        super().setup()
        folder = os.environ.get("CANCEL_PROBE_DIR")
        if folder:
            for merger in self.mergers.values():
                _add_pause_point(merger, Path(folder) / PAUSE_FILE)


def _add_pause_point(merger, arm_file: Path) -> None:
    write_layer, write_batch = merger._write_layer, merger._write_batch
    written = 0

    def maybe_pause(layers: int) -> None:
        nonlocal written
        if not arm_file.exists():
            written = 0
            return
        written += layers
        if written < int(arm_file.read_text() or "1"):
            return
        arm_file.unlink()
        print(f"cancel probe: paused mid-merge after {written} layers", flush=True)
        written = 0
        deadline = time.monotonic() + MAX_PAUSE_SECONDS
        while time.monotonic() < deadline:
            time.sleep(0.005)

    def write_layer_and_maybe_pause(layer_id, contributions) -> None:
        write_layer(layer_id, contributions)
        maybe_pause(1)

    def write_batch_and_maybe_pause(members) -> None:  # same-shape layers written together (LoraMerger._write_layers)
        write_batch(members)
        maybe_pause(len(members))

    merger._write_layer = write_layer_and_maybe_pause
    merger._write_batch = write_batch_and_maybe_pause
