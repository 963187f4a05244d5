"""`make bench`: run every `benchmarks/bench_*.py`, each in its own process, and index the results.

What: every benchmark script runs as a fresh subprocess, in sorted order (so memory high-water
marks, compiled kernels, thread pools and page-cache effects of one script cannot leak into the
next). Each script writes its own `outputs/bench/<name>.md` + `<name>.json`; this driver records
which scripts passed, how long each took, the tail of a failure's output, and writes the index
`outputs/bench/README.md` with the machine and the command that made the tables.

Why a driver and not one big script: a benchmark that crashes or produces a wrong result (every
script validates before it times, and exits non-zero when validation fails) must not take the
others down with it, and must not go unnoticed either: the driver runs them all, then exits
non-zero if any failed, so `make bench` fails loudly.

Common bug: running benchmarks in one process, one after the other; the second one then measures
a warm allocator, a larger resident set and an already-compiled kernel cache.

Usage:
    python benchmarks/run_all.py                       # every bench_*.py
    python benchmarks/run_all.py --quick               # every bench_*.py --quick (a smoke run)
    python benchmarks/run_all.py --only ladder loaders # names containing any of these words
"""
import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

from minitrain.files import write_atomic
from minitrain.style import repo_root

ROOT = repo_root()
DEFAULT_BENCH_DIR = pathlib.Path(__file__).resolve().parent


def find_scripts(bench_dir, only=None):
    """Every `bench_*.py` in `bench_dir`, sorted by name; `only` keeps names containing a word."""
    scripts = sorted(pathlib.Path(bench_dir).glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if any(word in s.stem for word in only)]
    return scripts


def run_script(script, *, timeout_s, cwd, env=None, extra_args=()):
    """Run one benchmark as `python script [extra_args]` in a fresh process; returns a result
    dict (never raises on failure: a crash, a non-zero exit or a timeout is a failed result)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(script), *extra_args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        returncode = None
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = (exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or ""))
        stderr += f"\n[run_all] timed out after {timeout_s} s"
    except OSError as exc:  # the interpreter itself could not start
        returncode, stdout, stderr = None, "", f"[run_all] could not start: {exc}"
    seconds = time.perf_counter() - t0
    return {"script": script.name, "passed": returncode == 0, "returncode": returncode,
            "seconds": seconds, "stdout": stdout, "stderr": stderr}


def _git_commit():
    try:  # read-only: which commit made these numbers
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def render_index(results, *, out_dir, machine, commit, command):
    """The Markdown index: one row per script, links to the tables it wrote, failures' tails."""
    lines = ["# minitrain benchmarks", "",
             f"Made by `{command}` at commit `{commit}` on "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
             f"Machine: {machine.get('cpu')} ({machine.get('cpu_count')} cores), "
             f"torch {machine.get('torch')}, GPU: {machine.get('gpu') or 'none'}.", "",
             "Every script runs in its own process and validates its results before timing them. "
             "Numbers on a shared machine are noisy: compare ratios within one table, not across "
             "runs.", "",
             "| script | status | seconds | tables |", "|---|---|---:|---|"]
    for r in results:
        name = pathlib.Path(r["script"]).stem.removeprefix("bench_")
        tables = sorted(p.name for p in pathlib.Path(out_dir).glob(f"{name}*.md"))
        links = ", ".join(f"[{t}]({t})" for t in tables) or "-"
        status = "passed" if r["passed"] else (
            f"**FAILED** (exit {r['returncode']})" if r["returncode"] is not None
            else "**FAILED** (timed out or did not start)")
        lines.append(f"| {r['script']} | {status} | {r['seconds']:.1f} | {links} |")
    failed = [r for r in results if not r["passed"]]
    for r in failed:
        tail = (r["stdout"][-1500:] + "\n" + r["stderr"][-2500:]).strip()
        lines += ["", f"## {r['script']} failed", "", "```", tail, "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench-dir", type=pathlib.Path, default=DEFAULT_BENCH_DIR,
                        help="folder holding bench_*.py (default: benchmarks/)")
    parser.add_argument("--out-dir", type=pathlib.Path, default=None,
                        help="where the index README.md goes (default: <repo>/outputs/bench/)")
    parser.add_argument("--quick", action="store_true",
                        help="pass --quick to every script: a smoke run, not the real numbers")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only scripts whose name contains one of these words")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds one script may run before it counts as failed")
    args = parser.parse_args(argv)
    if args.out_dir is None:
        args.out_dir = ROOT / "outputs" / "bench"
    if args.timeout <= 0:
        raise SystemExit("--timeout must be > 0 seconds")
    scripts = find_scripts(args.bench_dir, args.only)
    if not scripts:
        print(f"run_all: no bench_*.py found in {args.bench_dir}", file=sys.stderr)
        return 1
    env = {**os.environ, "MPLBACKEND": "Agg"}  # benchmarks that plot write files only
    extra = ("--quick",) if args.quick else ()
    results = []
    for script in scripts:
        print(f"=== {script.name}{' --quick' if args.quick else ''}", flush=True)
        r = run_script(script, timeout_s=args.timeout, cwd=ROOT, env=env, extra_args=extra)
        sys.stdout.write(r["stdout"])
        if not r["passed"]:
            sys.stdout.write(r["stderr"][-3000:])
        print(f"=== {script.name}: {'passed' if r['passed'] else 'FAILED'} "
              f"in {r['seconds']:.1f} s", flush=True)
        results.append(r)

    try:
        from benchmarks.harness import machine_metadata
        machine = machine_metadata()
    except Exception as exc:  # the index must still be written if minitrain itself is broken
        machine = {"cpu": f"unknown ({exc})"}
    command = "python benchmarks/run_all.py" + (" --quick" if args.quick else "") + (
        f" --only {' '.join(args.only)}" if args.only else "")
    index = render_index(results, out_dir=args.out_dir, machine=machine, commit=_git_commit(),
                         command=command)
    write_atomic(args.out_dir / "README.md", index)
    summary = {"machine": machine, "quick": args.quick, "results": [
        {k: r[k] for k in ("script", "passed", "returncode", "seconds")} for r in results]}
    write_atomic(args.out_dir / "run_all.json", json.dumps(summary, indent=2) + "\n")
    failed = [r["script"] for r in results if not r["passed"]]
    print(f"run_all: {len(results) - len(failed)}/{len(results)} passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
