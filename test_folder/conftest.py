"""Shared fixtures: the tiny SDXL weights, built once per checkout of script/tiny_weights.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _tiny_weights_dir() -> Path:
    """Build (or reuse) the tiny weights; keyed by the generator's source so a change rebuilds them."""
    script = REPO / "script" / "tiny_weights.py"
    digest = hashlib.sha256(script.read_bytes() + (REPO / "utils.py").read_bytes()).hexdigest()[:12]
    target = REPO / ".cache" / f"tiny-weights-{digest}"
    if (target / "TINY").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        subprocess.run([sys.executable, str(script), str(staging)], check=True, capture_output=True)
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tiny_weights() -> Path:
    """WEIGHTS_DIR with tiny random SDXL-architecture models in the real layout (read-only for tests)."""
    return _tiny_weights_dir()
