"""benchmarks/quickstart_seeds.py: one run per seed, each with its own seed, and a summary of who meets the targets."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from test_pipeline import TINY

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quickstart_seeds.py"


def test_seed_sweep_runs_each_seed_and_counts_targets(tmp_path):
    root = tmp_path / "seeds"
    r = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "3-4", "--jobs", "2", "--run-root", str(root), *TINY],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-3000:]
    for seed in (3, 4):
        resolved = yaml.safe_load((root / f"s{seed}" / "recipe.yaml").read_text())
        assert resolved["seed"] == seed and resolved["stages"][4]["steps"] == 4  # its own seed, the overrides
        assert (root / f"s{seed}" / "eval.json").is_file()
    # a few training steps cannot reach the targets: both runs are listed, neither passes
    assert "0 of 2 runs meet every target" in r.stdout
    assert r.stdout.count(" no ") >= 2


def test_seed_sweep_reports_a_failed_run(tmp_path):
    root = tmp_path / "seeds"
    r = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "0", "--jobs", "1", "--run-root", str(root),
                        "stages.encoder.steps=-1"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 1, r.stderr[-3000:]
    assert "failed (exit" in r.stdout and "0 of 1 runs meet every target" in r.stdout
    assert "steps" in (root / "s0.log").read_text()  # the run's own one-line error is in its log


def test_seed_sweep_rejects_bad_seeds_and_jobs(tmp_path):
    for args, message in ((["--seeds", "0-x"], "'0-x' is not a seed"), (["--seeds", "5-2"], "names no seeds"),
                          (["--jobs", "0"], "must be a whole number >= 1")):
        r = subprocess.run([sys.executable, str(SCRIPT), *args, "--run-root", str(tmp_path / "seeds")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "seeds").exists()  # nothing started
