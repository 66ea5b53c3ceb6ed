"""benchmarks/gpu_suite.sh runs every step of the GPU figures; here tiny, on the CPU (--smoke)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def test_usage_error_without_arguments() -> None:
    proc = subprocess.run(["bash", str(SUITE)], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.slow
def test_smoke_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SUITE), "-", str(out), "--smoke"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== 0 step(s) failed" in proc.stdout
    logs = {p.name for p in out.iterdir()}
    assert {"machine.log", "relevancy.log", "relevancy_profile.log", "medgemma.log", "medgemma.json", "e2e.log",
            "e2e_report.md", "relevancy_4b.log"} <= logs
    assert "engine vs reference (chefer text maps)" in (out / "relevancy.log").read_text()
    assert "engine phase gradients" in (out / "relevancy_profile.log").read_text()
    figures = json.loads((out / "medgemma.json").read_text())
    done = {(r["attn"], r["batch"]) for r in figures["results"] if r.get("seconds_per_study", 0) > 0}
    assert done == {(a, b) for a in ("eager", "vision_sdpa") for b in (1, 2)}
    assert "profile generate (batch 2)" in (out / "medgemma.log").read_text()
    e2e = (out / "e2e.log").read_text()
    assert "stage report done" in e2e and "relevancy: " in e2e and "errors: " not in e2e
