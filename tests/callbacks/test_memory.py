"""Memory does not grow with epochs: every probe at every epoch, 15 epochs against 3 (separate processes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
ALLOWED_GROWTH_MB = 40


def peak_rss_mb(epochs: int, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_run.py"), str(epochs), str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(re.search(r"PEAK_RSS_KB (\d+)", result.stdout).group(1)) / 1024


def test_peak_memory_does_not_grow_with_epochs(tmp_path):
    short = peak_rss_mb(3, tmp_path / "short")
    long = peak_rss_mb(15, tmp_path / "long")
    print(f"peak RSS: 3 epochs {short:.1f} MB, 15 epochs {long:.1f} MB")
    assert long - short < ALLOWED_GROWTH_MB, (short, long)
