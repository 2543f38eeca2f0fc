"""Run the GPU tests one pytest process per test file, several files at once, each under its own time cap.

scripts/gpu_suite.sh's `verdict` step. Parallel processes warm the Triton and CUDA caches together on
the GPU machine's cores (one cold compile per kernel configuration, shared through Triton's cache),
and the cap per file means one slow file cannot starve the rest: a file over its cap is reported as
timed out and the others still finish. Every file's log goes to <log-dir>/<file>.log; the last line
printed is a pytest-style summary that adds up every file ("412 passed, 3 skipped, 1 timed out in
180.2s"), which benchmarks/write_readme_perf.py reads.

Usage: python scripts/run_gpu_tests.py [--mark "gpu and not slow"] [--jobs 8] [--file-cap 150]
           [--log-dir DIR] [--list]
Exit status: 0 when every file passed (or had nothing selected), else 1.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed", "deselected")


def gpu_test_files(root: Path = ROOT) -> list[Path]:
    """Test files that hold a GPU test (a `gpu` marker): the others have nothing to select."""
    out = []
    for path in sorted((root / "tests").rglob("test_*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if re.search(r"mark\.gpu\b|marks=\[?pytest\.mark\.gpu", text):
            out.append(path)
    return out


def counts(text: str) -> dict[str, int]:
    """Counts of pytest's summary line ('3 passed, 1 skipped in 2.0s'); {} without one."""
    for line in reversed(text.strip().splitlines()):
        if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b.* in [\d.]+s", line):
            return {("errors" if w.startswith("error") else w): int(n)
                    for n, w in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", line)}
    return {}


def run_file(path: Path, mark: str, cap: float, log_dir: Path) -> tuple[Path, int, dict[str, int], float]:
    log = log_dir / (str(path.relative_to(ROOT)).replace("/", "__") + ".log")
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-m", mark, "-p", "no:cacheprovider", str(path)]
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=cap, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = time.perf_counter() - start
    text = log.read_text(encoding="utf-8", errors="replace")
    if rc == 124:
        with open(log, "a") as f:
            f.write(f"\nTIMED OUT after {cap:.0f} s\n")
    return path, rc, counts(text), seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mark", default="gpu and not slow")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--file-cap", type=float, default=150.0, help="seconds per test file")
    parser.add_argument("--log-dir", type=Path, default=Path("gpu-tests"))
    parser.add_argument("--list", action="store_true", help="print the files and exit")
    parser.add_argument("--files", nargs="+", type=Path, help="these test files instead of every GPU test file")
    args = parser.parse_args(argv)
    files = [p.resolve() for p in args.files] if args.files else gpu_test_files()
    if args.list:
        print("\n".join(str(f.relative_to(ROOT)) for f in files))
        return 0
    args.log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    total = dict.fromkeys(WORDS, 0)
    timed_out, bad = [], []
    # the slowest files first (largest first, as a proxy), so they are not the ones left at the end
    order = sorted(files, key=lambda p: -p.stat().st_size)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        for path, rc, c, seconds in pool.map(lambda p: run_file(p, args.mark, args.file_cap, args.log_dir), order):
            name = path.relative_to(ROOT)
            for k, v in c.items():
                total[k] = total.get(k, 0) + v
            verdict = "timed out" if rc == 124 else ("ok" if rc in (0, 5) else f"rc {rc}")
            print(f"{name}: {verdict} in {seconds:.0f} s ({', '.join(f'{v} {k}' for k, v in c.items()) or 'no summary'})",
                  flush=True)
            if rc == 124:
                timed_out.append(str(name))
            elif rc not in (0, 5):  # 5: nothing selected in this file
                bad.append(str(name))
    parts = [f"{total[k]} {k}" for k in WORDS if total.get(k)]
    if timed_out:
        parts.append(f"{len(timed_out)} timed out")
    print(f"files failed: {', '.join(bad) or 'none'}; timed out: {', '.join(timed_out) or 'none'}")
    print(f"{', '.join(parts) or 'no tests ran'} in {time.perf_counter() - start:.1f}s")
    return 1 if (bad or timed_out) else 0


if __name__ == "__main__":
    sys.exit(main())
