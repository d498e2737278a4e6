"""convert/parity.py: the PyTorch-vs-JAX parity report, run as its users run it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import speech_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = ("semantic_encoder", "semantic_adapter", "acoustic_encoder", "fc_encoder", "latents", "audio")


def _parity(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convert.parity", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.subprocess
@pytest.mark.slow
def test_parity_report_float32_highest(small_ref, tmp_path):
    audio = min(speech_files(), key=os.path.getsize)  # the shortest utterance, under a second
    report_path = tmp_path / "report.json"
    proc = _parity(
        small_ref.path, audio, "--dtype", "float32", "--precision", "highest", "--json", str(report_path)
    )
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    for stage in (*STAGES, "codes agreement", "float32/highest", "reference's codes"):
        assert stage in proc.stdout

    report = json.loads(report_path.read_text())
    (run,) = report["runs"]
    assert (run["dtype"], run["precision"]) == ("float32", "highest")
    assert run["codes_total"] > 0 and run["codes_agreement"] == 1.0
    assert set(run["stages"]) == set(STAGES)
    for stage, err in run["stages"].items():
        assert 0 <= err <= 1e-4, (stage, err)
    assert report["files"][0]["path"] == audio and report["files"][0]["codes"] == run["codes_total"]
    for name in ("jax", "jaxlib", "flax", "torch", "transformers", "xcodec2_jax"):
        assert report["versions"][name], name
    assert report["device"]["backend"] and report["device"]["device_kind"]


@pytest.mark.subprocess
def test_parity_missing_audio(small_ref, tmp_path):
    missing = str(tmp_path / "nope.wav")
    proc = _parity(small_ref.path, speech_files()[0], missing, timeout=120)
    assert proc.returncode == 2
    assert f"audio file not found: {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
