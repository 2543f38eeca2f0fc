"""Combine a GPU suite run into one results.json, and write README.md's performance section from it.

    python benchmarks/write_readme_perf.py --collect OUT_DIR [--results OUT_DIR/results.json]
        reads what scripts/gpu_suite.sh left in OUT_DIR (steps.tsv, tests.log, sanitize_*.log,
        backends.txt, bench_*.json) and writes the combined results.json: GPU name, driver, CUDA, torch,
        triton, commit, the test summary counts, the sanitizer results, every step's exit code and
        seconds, and the content of every bench_*.json.
    python benchmarks/write_readme_perf.py RESULTS.json [--readme README.md]
        rewrites the part of the README between `<!-- perf:start -->` and `<!-- perf:end -->` (adding
        the two markers at the end of the "Status" section when they are missing) with tables made
        from RESULTS.json: device and versions, tests and sanitizers, per kernel benchmark the
        forward+backward rows (fastest of ours against the fastest baseline, speedup, peak memory),
        and the training-step table.
Both may be given at once (--collect then the README from the file just written).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import sys

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
PLACEHOLDER = "No GPU results yet."
BENCH_TITLES = {
    "bench_inner_attention": "Inner attention and the inner sub-block",
    "bench_nested_attention": "Nested-logit attention (CODA / RealFormer)",
    "bench_hsim_split": "H_sim-split linear (TinT)",
}
TEST_WORDS = ("passed", "failed", "skipped", "xfailed", "xpassed", "error", "errors", "deselected", "warnings", "warning")


# ------------------------------------------------------------------ collect

def parse_pytest_summary(text: str) -> dict:
    """Counts from pytest's last summary line ('12 passed, 3 skipped in 4.5s'); {} when there is none."""
    line = None
    for candidate in text.splitlines():
        if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b.* in [\d.]+s", candidate):
            line = candidate
    if line is None:
        return {}
    counts = {}
    for n, word in re.findall(r"(\d+) (\w+)", line):
        if word in TEST_WORDS:
            key = {"error": "errors", "warning": "warnings"}.get(word, word)
            counts[key] = counts.get(key, 0) + int(n)
    counts["summary"] = line.strip(" =")
    return counts


def read_steps(out_dir: str) -> dict:
    """steps.tsv lines `name<TAB>rc<TAB>seconds<TAB>note` (rc '-' for a step that did not run)."""
    steps = {}
    path = os.path.join(out_dir, "steps.tsv")
    if os.path.exists(path):
        for line in open(path, encoding="utf-8", errors="replace"):
            parts = line.rstrip("\n").split("\t")
            if not parts or not parts[0]:
                continue
            parts += [""] * (4 - len(parts))
            rc = int(parts[1]) if parts[1].lstrip("-").isdigit() else None
            steps[parts[0]] = dict(rc=rc, seconds=float(parts[2]) if _is_float(parts[2]) else None, note=parts[3])
    return steps


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _tail(path: str, lines: int = 25) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def sanitizer_result(step: dict | None, log: str | None) -> str:
    """'clean', 'errors', 'timeout', 'failed (rc N)' or 'not run (why)'."""
    if step is None:
        return "not run"
    if step["rc"] is None:
        return f"not run ({step['note']})" if step["note"] else "not run"
    if step["rc"] in (124, 137):
        return "timeout"
    if step["rc"] == 0:
        return "clean"
    if log and (re.search(r"ERROR SUMMARY: [1-9]\d* error", log) or re.search(r"\(\s*[1-9]\d* errors?", log)
                or re.search(r"^=+ (Invalid|Race|Program hit|Barrier|Uninitialized)", log, flags=re.M)):
        return "errors"
    if log and "FAILED after" in log:
        return f"script failed (rc {step['rc']})"
    return f"failed (rc {step['rc']})"


def collect(out_dir: str) -> dict:
    steps = read_steps(out_dir)
    benches = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "bench_*.json"))):
        try:
            with open(path) as f:
                benches[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
        except (OSError, ValueError) as exc:
            benches[os.path.splitext(os.path.basename(path))[0]] = dict(error=f"{type(exc).__name__}: {exc}")
    meta = {}
    metas = [b.get("meta") or {} for b in benches.values()]  # every benchmark records environment()
    for m in sorted(metas, key=lambda m: not m.get("gpu")):  # one from a GPU run first
        if m:
            meta = {k: m.get(k) for k in ("gpu", "cpu", "driver", "cuda", "torch", "triton", "tntkernels", "commit",
                                          "python")}
            break
    env_path = os.path.join(out_dir, "env.json")  # written by gpu_suite.sh even when no benchmark ran
    if os.path.exists(env_path):
        try:
            with open(env_path) as f:
                for k, v in json.load(f).items():
                    if meta.get(k) in (None, ""):
                        meta[k] = v
        except (OSError, ValueError):
            pass
    meta["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tests_log = os.path.join(out_dir, "tests.log")
    tests = parse_pytest_summary(open(tests_log, encoding="utf-8", errors="replace").read()) if os.path.exists(tests_log) else {}
    if "tests" in steps:
        tests["rc"] = steps["tests"]["rc"]
    sanitizers = {}
    for tool in ("memcheck", "racecheck", "memcheck_triton"):
        log = _tail(os.path.join(out_dir, f"sanitize_{tool}.log"), 30)
        if f"sanitize_{tool}" in steps or log is not None:
            st = steps.get(f"sanitize_{tool}")
            sanitizers[tool] = dict(result=sanitizer_result(st, log), rc=st and st["rc"], seconds=st and st["seconds"],
                                    tail=log)
    backends = _tail(os.path.join(out_dir, "backends.txt"), 40)
    return dict(meta=meta, tests=tests, sanitizers=sanitizers, steps=steps, backends=backends, benchmarks=benches)


# ------------------------------------------------------------------ render

def _ms(x):
    return "n/a" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _mib(x):
    return "–" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def kernel_table(bench: dict) -> list[str]:
    """One row per (what, shape, batch, dtype) fwd+bwd case: fastest ours vs fastest baseline."""
    rows = [r for r in bench.get("rows", []) if r.get("pass_") == "fwd+bwd"]
    cases = []
    for r in rows:
        key = (r.get("what"), r.get("shape"), r.get("batch"), r.get("dtype"))
        if key not in cases:
            cases.append(key)
    out = ["| case | ours | ms | fastest baseline | ms | speedup | peak MiB (ours / baseline) |",
           "|---|---|---:|---|---:|---:|---:|"]
    for key in cases:
        sel = [r for r in rows if (r.get("what"), r.get("shape"), r.get("batch"), r.get("dtype")) == key
               and r.get("median_ms")]
        ours = [r for r in sel if str(r.get("impl", "")).startswith("ours")]
        base = [r for r in sel if not str(r.get("impl", "")).startswith("ours")]
        o = min(ours, key=lambda r: r["median_ms"]) if ours else None
        b = min(base, key=lambda r: r["median_ms"]) if base else None
        what, shape, batch, dtype = key
        case = f"{what} {shape} B={batch} {dtype}"
        ratio = b["median_ms"] / o["median_ms"] if o and b else None
        speed = "–" if ratio is None else f"**{ratio:.2f}×**" if ratio >= 1 else f"{ratio:.2f}×"
        out.append(f"| {case} | {o['impl'] if o else 'none ran'} | {_ms(o and o['median_ms'])} | "
                   f"{b['impl'] if b else 'none ran'} | {_ms(b and b['median_ms'])} | {speed} | "
                   f"{_mib(o and o.get('peak_mib'))} / {_mib(b and b.get('peak_mib'))} |")
    return out if len(out) > 2 else ["(no forward+backward rows)"]


def train_table(bench: dict) -> list[str]:
    rows = bench.get("rows", [])
    out = ["| model | B | impl | img/s | step ms (p20–p80) | peak MiB | vs baseline | note |",
           "|---|---:|---|---:|---:|---:|---:|---|"]

    def baseline(r):
        name = "rtnt_ti" if r.get("group") == "rtnt_ti" else "timm_eager"
        for s in rows:
            if s.get("impl") == name and s.get("batch") == r.get("batch") and s.get("img_per_s"):
                return s
        return None

    for r in rows:
        b = baseline(r)
        vs = f"{r['img_per_s'] / b['img_per_s']:.2f}×" if r.get("img_per_s") and b else "–"
        ips = f"{r['img_per_s']:.0f}" if r.get("img_per_s") else "n/a"
        ms = (f"{r['step_ms']:.1f} ({r['step_ms_p20']:.1f}–{r['step_ms_p80']:.1f})" if r.get("step_ms") else "n/a")
        note = str(r.get("note") or "").replace("|", "/")[:120]
        if r.get("compile_s"):
            note = (f"compile {r['compile_s']:.0f} s " + note).strip()
        out.append(f"| {r.get('model')} | {r.get('batch')} | {'**' + r['impl'] + '**' if r.get('ours') else r.get('impl')} "
                   f"| {ips} | {ms} | {_mib(r.get('peak_mib'))} | {vs} | {note} |")
    return out if len(out) > 2 else ["(no rows)"]


def render(results: dict) -> str:
    m = results.get("meta", {})
    lines = ["### GPU results", "",
             "Generated by `benchmarks/write_readme_perf.py` from the `results.json` of `scripts/gpu_suite.sh` "
             "(do not edit by hand).", "",
             f"Device: **{m.get('gpu') or (m.get('cpu') and 'CPU ' + m['cpu']) or 'unknown'}** · driver {m.get('driver') or '?'} · CUDA {m.get('cuda') or '?'} · "
             f"torch {m.get('torch') or '?'} · triton {m.get('triton') or '?'} · commit `{m.get('commit') or '?'}` · "
             f"{m.get('date') or ''}".rstrip(" ·"), ""]
    t = results.get("tests") or {}
    status = []
    if t:
        counts = ", ".join(f"{t[k]} {k}" for k in ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")
                           if t.get(k))
        status.append(f"GPU tests (`-m \"gpu and not slow\"`): {counts or t.get('summary') or 'no summary'}")
    for tool, s in (results.get("sanitizers") or {}).items():
        status.append(f"compute-sanitizer {tool.replace('_', ' ')}: {s.get('result')}")
    if status:
        lines += ["; ".join(status) + ".", ""]
    benches = results.get("benchmarks") or {}
    is_train = lambda b: (b.get("meta") or {}).get("benchmark") == "train_step"  # noqa: E731
    kernel_names = [n for n in BENCH_TITLES if n in benches] + sorted(
        n for n in benches if n not in BENCH_TITLES and n != "bench_train" and not is_train(benches[n]))
    for name in kernel_names:
        b = benches[name]
        lines += [f"#### {BENCH_TITLES.get(name, name)} — forward + backward, median ms", ""]
        lines += ([f"(failed to read: {b['error']})"] if "error" in b else kernel_table(b)) + [""]
    train_names = [n for n in sorted(benches) if n == "bench_train" or is_train(benches[n])]
    for name in sorted(train_names, key=lambda n: n != "bench_train"):
        b = benches[name]
        bm = b.get("meta") or {}
        title = "Training step" + ("" if name == "bench_train" else f" ({name})")
        lines += [f"#### {title} (forward, loss, backward, {bm.get('optimizer', 'AdamW')}; autocast "
                  f"{bm.get('amp') or 'off'}; median of {bm.get('steps')} steps) — higher img/s is better", ""]
        lines += ([f"(failed to read: {b['error']})"] if "error" in b else train_table(b))
        lines += ["", "vs baseline: img/s over timm_eager at the same batch (RTNT: over rtnt_ti with the default backend). "
                  "vit_s16 is the ceiling (same outer width, no inner level).", ""]
        if b.get("complete") is False:
            lines += ["(the training benchmark was cut short: rows missing)", ""]
    return "\n".join(lines).rstrip() + "\n"


def replace_section(readme: str, section: str) -> str:
    """readme with the text between the markers replaced by section; markers added at the end of the
    "Status" section (before the next "## " heading) when missing, else at the end."""
    if START not in readme or END not in readme:
        block = f"{START}\n{PLACEHOLDER}\n{END}\n"
        mstat = re.search(r"^## Status[^\n]*\n", readme, flags=re.M)
        nxt = re.search(r"^## ", readme[mstat.end():], flags=re.M) if mstat else None
        if mstat and nxt:
            at = mstat.end() + nxt.start()
            readme = readme[:at].rstrip("\n") + "\n\n" + block + "\n" + readme[at:]
        else:
            readme = readme.rstrip("\n") + "\n\n" + block
    i, j = readme.index(START), readme.index(END)
    if j < i:
        raise ValueError(f"{END} comes before {START}")
    return readme[:i + len(START)] + "\n" + section.rstrip("\n") + "\n" + readme[j:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", help="results.json to render into the README")
    ap.add_argument("--collect", metavar="OUT_DIR", help="combine a gpu_suite.sh output folder into results.json")
    ap.add_argument("--results", dest="results_out", help="where --collect writes (default OUT_DIR/results.json)")
    ap.add_argument("--readme", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"))
    ap.add_argument("--no-readme", action="store_true", help="with --collect: only write results.json")
    ap.add_argument("--section-out", help="also write the generated section (markdown) to this file")
    args = ap.parse_args(argv)
    path = args.results
    if args.collect:
        results = collect(args.collect)
        path_out = args.results_out or os.path.join(args.collect, "results.json")
        with open(path_out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {path_out}")
        path = path or path_out
        if args.no_readme:
            if args.section_out:
                with open(args.section_out, "w", encoding="utf-8") as f:
                    f.write(render(results))
            return 0
    if not path:
        ap.error("give RESULTS.json or --collect OUT_DIR")
    with open(path) as f:
        results = json.load(f)
    with open(args.readme, encoding="utf-8") as f:
        readme = f.read()
    section = render(results)
    if args.section_out:
        with open(args.section_out, "w", encoding="utf-8") as f:
            f.write(section)
    new = replace_section(readme, section)
    with open(args.readme, "w", encoding="utf-8") as f:
        f.write(new)
    print(f"rewrote the performance section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
