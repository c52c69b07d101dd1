"""Fuzzing the real Cog server with schemathesis: the short version of bench/fuzz_server.py, plus regression tests
for what the fuzzer found.

test_short_fuzz_run runs bench/fuzz_server.py itself (same server start, same network isolation, same checks; see
its docstring) with a fixed seed, so the generated requests are the same on every run with the pinned schemathesis
and Hypothesis versions. It uses --small-work: valid step counts, sizes, output counts and hires scales are mapped
to small valid values before sending (invalid ones are sent unchanged), because a valid 1024x1024 28-step
prediction takes about 30 s with the tiny model on this CPU and a few hundred cases must fit in the test budget.
About a fifth of the cases come from the fuzzer's hostile generators (--hostile-share 0.2, its default).
The full-schema run of 10 000 cases is the benchmark (bench/NOTES.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CASES = 80
SEED = 1  # with image/mask as plain strings (issue 14), seed 0 draws no prediction that succeeds


def test_short_fuzz_run_has_no_crash_server_error_hang_or_unclear_error(tmp_path):
    out, failures = tmp_path / "fuzz.json", tmp_path / "failures"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fuzz_server.py"), "--cases", str(CASES), "--seed", str(SEED),
         "--small-work", "--timeout", "20", "--grace", "60", "--out", str(out), "--failures-dir", str(failures)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert out.exists(), f"fuzzer did not finish:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    reproducers = "\n".join(p.read_text() for p in sorted(failures.glob("case-*.json")))[:6000]
    assert result["problems"] == 0, f"{result['first_problems']}\nreproducers:\n{reproducers}"
    assert (result["crashes"], result["server_errors"], result["hangs"]) == (0, 0, 0)
    assert result["count"] == CASES
    assert result["server_alive_at_end"]
    if os.geteuid() == 0 and shutil.which("unshare"):  # as root the run is sealed off: only loopback exists
        assert result["settings"]["isolation"] == "network namespace (unshare --net)"
    # Both kinds of traffic really went through: schema-valid predictions (some succeeded, some failed with a
    # clear error) and schema-invalid bodies answered 422 by coglet's validation.
    assert result["by_status"].get("422", 0) > 0 and result["by_status"].get("200", 0) > 0
    assert result["prediction_status"].get("succeeded", 0) > 0
    assert result["modes"].get("positive", 0) > 0 and result["modes"].get("negative", 0) > 0
    # And issue 14's hand-made hostile shapes (long whitespace, nested brackets, "<lora:" runs, odd images).
    assert result["modes"].get("hostile", 0) > 0 and result["hostile_kinds"]


@pytest.mark.parametrize(
    "prompt_input, text",
    [
        ("prompt", "red (hat:" + "9" * 400 + ")"),
        ("negative_prompt", "((blurry:" + "9" * 200 + "):" + "9" * 200 + ")"),
    ],
    ids=["overflowing weight in prompt", "overflowing nested weights in negative_prompt"],
)
def test_overflowing_attention_weight_fails_clearly_instead_of_a_black_image(cog_server, prompt_input, text):
    """Found by the fuzzer: the prediction succeeded with an all-black image (NaN embeddings)."""
    inputs = {"prompt": "1girl", "aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 1,
              prompt_input: text}
    result = cog_server.predict(inputs)
    assert result["status"] == "failed"
    assert f"{prompt_input}: the attention weight of" in result["error"]
    assert "too large" in result["error"]
