"""Running `tntkernels-train` in-process from tests, and reading what a run wrote."""
from __future__ import annotations

import json
from pathlib import Path

from tntkernels import train

# metrics that are measured, not computed: they differ between otherwise identical runs
TIMING = ("img_per_s", "peak_mem_mb", "seconds")


def run(argv, capsys):
    """train.main(argv) in this process; returns (exit code, stdout, stderr)."""
    rc = train.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def metrics(out_dir) -> list[dict]:
    """The run's OUT/metrics.jsonl, one dict per epoch."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def without_timing(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in TIMING}


def assert_one_error_line(rc, err, *fragments):
    """Exit code 2 and exactly one stderr line, `tntkernels-train: error: ...`, holding each fragment."""
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tntkernels-train: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
