"""`make check`: run an exercise's property tests on the learner's file and report in words.

What: `check(exercises, workspace)` starts ONE fresh pytest process (python tests/exercise_check.py
--pytest ...) with MINITRAIN_EXERCISE=<names>, so tests/implementation.py hands the tests the
learner's names. A small plugin (`Collector`) records each test's docstring, outcome and failure
text as JSON; the parent groups parametrized cases into one property per test function and prints
    PASS / FAIL / NOT STARTED   the property, in the words of the test's docstring
and for a failure: Hypothesis's minimal counterexample and the assertion that compares the
learner's result with the built-in's. A failure whose text is the stub's own
`NotImplementedError("exercise clip: write grad_norm")` is NOT STARTED (and names what to write).
The process has a wall-clock limit and is killed with its whole process group, so a deadlocked
ring cannot hang `make check`.

Why a separate process: each check imports the learner's file fresh, and a crash (or a stuck
rank) of the learner's code cannot take the tool down with it.

Common bug: reading "0 failed" as "all passed" when nothing was collected: a check with no
property is reported as an error, never as passing.
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile

import exercise_kit as kit

REPO = kit.REPO
PROFILE = "exercises"      # tests/conftest.py: like "ci", without the example database


# ---- inside the pytest process ----------------------------------------------------------
class Collector:
    """pytest plugin: every test's docstring, outcome and failure text; 3-rank cases deselected."""

    def __init__(self, two_ranks_only):
        self.items, self.errors, self.two_ranks_only = {}, [], two_ranks_only

    def pytest_collection_modifyitems(self, config, items):
        keep, drop = [], []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            world = params.get("world", params.get("world_size", 2))
            (drop if self.two_ranks_only and world != 2 else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
        for item in items:
            doc = getattr(getattr(item, "obj", None), "__doc__", None)
            if not doc and getattr(item, "cls", None) is not None:
                doc = item.cls.__dict__.get("__doc__")
            self.items[item.nodeid] = {"doc": " ".join((doc or item.name).split()),
                                       "outcome": "passed", "text": ""}

    def pytest_runtest_logreport(self, report):
        rec = self.items.setdefault(report.nodeid, {"doc": report.nodeid, "outcome": "passed", "text": ""})
        if report.failed:
            rec["outcome"] = "failed"
            rec["text"] += report.longreprtext
        elif report.skipped and rec["outcome"] == "passed":
            rec["outcome"] = "skipped"

    def pytest_collectreport(self, report):
        if report.failed:
            self.errors.append({"nodeid": report.nodeid, "text": report.longreprtext})


def _run_inside(out_path, two_ranks_only, pytest_args):
    import pytest
    collector = Collector(two_ranks_only)
    rc = pytest.main(pytest_args, plugins=[collector])
    pathlib.Path(out_path).write_text(json.dumps(
        {"rc": int(rc), "items": collector.items, "errors": collector.errors}))
    return 0


# ---- in the tool ----------------------------------------------------------------------------
def run_tests(exercises, ws, timeout_s=900.0):
    """Run the exercises' tests against `ws` in a fresh pytest process; the Collector's JSON."""
    node_ids = list(dict.fromkeys(t for ex in exercises for t in ex.tests))
    env = {**os.environ, "MINITRAIN_EXERCISE": ",".join(ex.name for ex in exercises),
           "MINITRAIN_WORKSPACE": str(ws), "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.setdefault("HYPOTHESIS_PROFILE", PROFILE)
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "results.json"
        args = ["-q", "-o", "addopts=", "-p", "no:cacheprovider", "--tb=short", *node_ids]
        two = "1" if any(ex.distributed for ex in exercises) else "0"
        cmd = [sys.executable, __file__, "--pytest", str(out), two, *args]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)       # pytest and every rank it started
            proc.communicate()
            return {"timeout": timeout_s, "items": {}, "errors": []}
        if not out.exists():
            return {"rc": proc.returncode, "items": {}, "errors": [{"nodeid": "pytest", "text": output}]}
        return json.loads(out.read_text())


NOISE = re.compile(r"^(Explanation:|These lines were always|/|You can reproduce|assert False$|"
                   r"assert not |comparison failed$|\+|where )")


def _failure(text):
    """(what differs, minimal counterexample) from pytest's 'E   ' lines of one failure.

    The counterexample is Hypothesis's 'Failing test case: test_x(...)' block (older versions:
    'Falsifying example:') plus its notes; what differs is the assertion before it, which the
    tests word as yours vs the built-in's."""
    lines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
    lines = [ln for ln in lines if ln and not NOISE.match(ln)]
    start = next((i for i, ln in enumerate(lines)
                  if ln.startswith(("Failing test case:", "Falsifying example:"))), None)
    if start is None:
        return lines[:12], []
    end = next((i for i in range(start, len(lines)) if lines[i] == ")"), len(lines) - 1)
    example = lines[start:end + 1] + lines[end + 1:end + 4]      # + notes (e.g. the gradients)
    return lines[:start][:12], example[:30]


def _where_in_learner_file(text, ws):
    """Where the learner's file raised (traceback frames), or the lines only failing cases ran."""
    path = re.escape(str(ws))
    frames = re.findall(rf"({path}/\w+\.py):(\d+): in ", text)
    if frames:
        return f"raised in your file at {kit._rel(frames[-1][0])}:{frames[-1][1]}"
    only = re.findall(rf"^E?\s*({path}/\w+\.py):(\d+)$", text, re.M)
    if only:
        return "your lines run only by failing cases: " + ", ".join(f"{kit._rel(f)}:{n}" for f, n in only)
    return ""


def properties(ex, results, ws):
    """[(status, property doc, detail lines)] for exercise `ex`, one per test function."""
    groups = {}
    for node_id, rec in results["items"].items():
        if any(node_id == t or node_id.startswith(t + "::") or node_id.startswith(t + "[") for t in ex.tests):
            groups.setdefault(node_id.split("[")[0], []).append((node_id, rec))
    out = []
    for base, recs in groups.items():
        failed = [(n, r) for n, r in recs if r["outcome"] == "failed"]
        doc = recs[0][1]["doc"]
        if not failed:
            status = "SKIP" if all(r["outcome"] == "skipped" for _, r in recs) else "PASS"
            out.append((status, doc, []))
            continue
        text = failed[0][1]["text"]
        todo = sorted({w for e, w in kit.NOT_STARTED.findall(text) if e == ex.name})
        if todo:
            todo_line = f"write {', '.join(todo)} (it still raises NotImplementedError)"
            out.append(("NOT STARTED", doc, [todo_line]))
            continue
        detail = [f"failing case: {failed[0][0].split('::')[-1]}"] if len(recs) > 1 else []
        differs, example = _failure(text)
        detail += ["what differs (yours vs the built-in):"] + ["  " + ln for ln in differs]
        if example:
            detail += ["minimal counterexample (Hypothesis shrank it to this):"]
            detail += ["  " + ln for ln in example]
        where = _where_in_learner_file(text, ws)
        if where:
            detail.append(where)
        out.append(("FAIL", doc, detail))
    return out


def report(ex, results, ws):
    """(report text, summary dict) for one exercise."""
    head = (f"exercise {ex.name} - lesson {kit.lesson_title(ex.lesson)} - your file "
            f"{kit._rel(ws / (ex.name + '.py'))} (solution: {kit._rel(kit.module_file(ex))})")
    lines = [head, "-" * min(len(head), 100)]
    if "timeout" in results:
        lines.append(f"TIMED OUT after {results['timeout']:.0f} s: the tests never finished (a deadlock?)")
        return "\n".join(lines), {"passed": 0, "total": 0, "not_started": 0}
    for err in results["errors"]:
        lines += [f"ERROR collecting {err['nodeid']}: your file does not import, or a test file is broken:"]
        lines += ["  " + ln for ln in (_failure(err["text"])[0] or err["text"].splitlines()[-8:])]
    props = properties(ex, results, ws)
    if not props and not results["errors"]:
        lines.append("ERROR: no property was collected for this exercise (check the registry)")
    for status, doc, detail in props:
        lines.append(f"{status:<12}{doc}")
        lines += [" " * 14 + d for d in detail]
    passed = sum(s in ("PASS", "SKIP") for s, _, _ in props)
    not_started = sum(s == "NOT STARTED" for s, _, _ in props)
    ok = props and passed == len(props) and not results["errors"]
    env = f"MINITRAIN_EXERCISE={ex.name}"
    if ws != kit.workspace_dir():
        env += f" MINITRAIN_WORKSPACE={ws}"
    lines.append(f"{passed} of {len(props)} properties pass" + (" - exercise done!" if ok else
                 f"; full tracebacks: {env} .venv/bin/python -m pytest " + " ".join(ex.tests)))
    return "\n".join(lines), {"passed": passed, "total": len(props), "not_started": not_started,
                              "ok": bool(ok)}


def check(exercises, ws, json_path=None, timeout_s=900.0):
    """Print the report of each exercise; exit status 0 only if every property of every one passes."""
    missing = [ex for ex in exercises if not (ws / f"{ex.name}.py").exists()]
    for ex in exercises:
        ok, why = kit.available(ex)
        if not ok:
            print(f"exercise {ex.name}: not available yet ({why})")
            return 2
    for ex in missing:
        print(f"exercise {ex.name}: not started: {kit._rel(ws / (ex.name + '.py'))} does not exist; "
              f"make exercise NAME={ex.name} creates it")
    todo = [ex for ex in exercises if ex not in missing]
    if not todo:
        return 1
    results = run_tests(todo, ws, timeout_s)
    status_path = ws / ".status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    summaries = {}
    for ex in todo:
        text, summary = report(ex, results, ws)
        print(text + "\n")
        summary["hash"] = kit._digest((ws / f"{ex.name}.py").read_text())
        status[ex.name] = summaries[ex.name] = summary
    status_path.write_text(json.dumps(status, indent=1))
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps(
            {"summaries": summaries, "properties": {ex.name: properties(ex, results, ws) for ex in todo}}))
    return 0 if not missing and all(s.get("ok") for s in summaries.values()) else 1


def table(exercises, ws):
    """`make exercises`: one row per exercise, in lesson order, with the learner's status."""
    status = json.loads((ws / ".status.json").read_text()) if (ws / ".status.json").exists() else {}
    rows = [("#", "exercise", "lesson", "write (in minitrain's module)", "status")]
    waiting = []
    for i, ex in enumerate(exercises, 1):
        ok, why = kit.available(ex)
        path = ws / f"{ex.name}.py"
        if not ok:
            state = "not available yet"
            waiting.append(f"  {ex.name}: {why}")
        elif not path.exists() or kit._digest(path.read_text()) == kit._digest(kit.stub_text(ex)):
            state = "not started"
        elif status.get(ex.name, {}).get("hash") != kit._digest(path.read_text()):
            state = "edited, not checked yet"
        else:
            s = status[ex.name]
            state = ("passing" if s.get("ok") else "not started" if s["not_started"] == s["total"]
                     else f"failing ({s['passed']}/{s['total']} pass)")
        rows.append((str(i), ex.name, kit.lesson_title(ex.lesson),
                     f"{kit._rel(kit.module_file(ex))}: {', '.join(ex.names)}", state))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4] for r in rows]
    n_ok = sum(kit.available(ex)[0] for ex in exercises)
    lines += ["", f"{len(exercises)} exercises, {n_ok} available now; workspace {kit._rel(ws)}/.",
              "Start one: make exercise NAME=schedule; grade it: make check NAME=schedule"]
    if waiting:
        lines += ["Not available yet:"] + waiting
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:2] == ["--pytest"]:
    sys.exit(_run_inside(sys.argv[2], sys.argv[3] == "1", sys.argv[4:]))
