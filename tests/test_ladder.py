"""The speed ladder: every rung adds one change, every rung trains, the table's speedups are
computed from the measured numbers, and `make bench`'s driver propagates failures.

The rungs are data in `minitrain.ladder`; measuring them is `benchmarks.ladder_runner`.

Compile rungs (7, 8): by default the test swaps inductor for the "aot_eager" backend. dynamo still
traces the model and AOTAutograd still builds the joint forward/backward graph under autocast
(graph breaks and dtype errors show up), but no C++ is generated: a cold inductor compile takes
50-110 s on 2 busy cores, more than this file's whole budget. `make bench` and lesson 10 run the
real inductor; MINITRAIN_TEST_INDUCTOR=1 makes this test use it too.
"""
import functools
import importlib.util
import json
import math
import os
import pathlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import ladder_runner as runner
from minitrain import ladder
from minitrain.bench import peak_memory_bytes
from minitrain.train import TrainConfig
from minitrain.train_config import validate_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = dict(steps=2, batch_size=2, seq_len=16, n_layer=1, n_head=2, n_embd=16, warmup_steps=0)
CPU_KEYS = ladder.RUNG_KEYS
# precision rungs also belong to lesson 09, the compile rung to lesson 10
EXTRA_MARKS = {"5": pytest.mark.lesson09, "5b": pytest.mark.lesson09, "7": pytest.mark.lesson10}
RUNG_PARAMS = [pytest.param(k, marks=EXTRA_MARKS[k]) if k in EXTRA_MARKS else k for k in CPU_KEYS]
pytestmark = pytest.mark.lesson11


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    data = runner.prepare_data(tmp_path_factory.mktemp("ladder") / "tokens.bin",
                               max_bytes=40_000)
    return ladder.default_base(**TINY, data=data)


@pytest.fixture(scope="module")
def reference(tiny_base, tmp_path_factory):
    return runner.train_rung("0", tiny_base, out_dir=tmp_path_factory.mktemp("r0"), warmup=1)


def test_each_rung_adds_exactly_one_change_to_the_rung_it_builds_on():
    """Rung 0 is the baseline; every other rung's full config differs from its parent's in
    exactly one field, the one it declares; main rungs form one chain 0 -> 1 -> ... -> 8."""
    base = ladder.default_base()
    assert {k: ladder.rung_overrides("0", base)[k] for k in ladder.BASELINE} == ladder.BASELINE
    for rung in ladder.RUNGS + ladder.GPU_RUNGS:
        if rung.builds_on is None:
            continue
        mine, parent = ladder.rung_overrides(rung.key, base), ladder.rung_overrides(
            rung.builds_on, base)
        changed = {k for k in mine if mine.get(k) != parent.get(k)}
        assert changed == set(rung.change) and len(changed) == 1, rung.key
    mains = [r for r in ladder.RUNGS if not r.side]
    assert [r.builds_on for r in mains[1:]] == [r.key for r in mains[:-1]]
    assert ladder.rung_overrides("8", base)["batch_size"] == 4 * base["batch_size"]


def test_every_rung_is_a_valid_train_config(tiny_base):
    """Each rung is reachable as TrainConfig flags: its overrides build a config that validates."""
    for key in CPU_KEYS:
        validate_config(TrainConfig(**ladder.rung_overrides(key, tiny_base)))


def test_unknown_rung_is_a_value_error():
    """A bad rung key raises ValueError naming the argument and the valid keys."""
    with pytest.raises(ValueError, match="rung must be one of"):
        ladder.get_rung("9")


@pytest.mark.parametrize("key", RUNG_PARAMS)
def test_every_rung_trains_two_steps(key, tiny_base, reference, tmp_path, monkeypatch):
    """Rung `key` trains 2 steps with finite losses and a positive speed, its config carries the
    rung's change, and its step-0 loss equals rung 0's within the rung's tolerance (same seed,
    same init, same first batch)."""
    if ladder.rung_overrides(key, tiny_base)["compile"] and \
            os.environ.get("MINITRAIN_TEST_INDUCTOR") != "1":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile,
                                                                backend="aot_eager"))
    result = reference if key == "0" else runner.train_rung(key, tiny_base, out_dir=tmp_path,
                                                            warmup=1)
    assert result["steps"] == 2
    assert math.isfinite(result["final_loss"]) and result["tokens_per_s"] > 0
    for name, value in ladder.get_rung(key).change.items():
        expected = value(tiny_base[name]) if callable(value) else value
        assert result["config"][name] == expected
    ok, reason = runner.validate([reference, result])[key]
    assert ok, reason


def test_run_rung_measures_in_a_fresh_process(tiny_base, tmp_path):
    """run_rung trains in another process, so the peak memory it reports is that process's own:
    after this process has touched 1 GiB, a tiny rung's reported peak stays below this process's
    peak (measured in this process, a high-water mark can only include the 1 GiB)."""
    import torch

    big = torch.ones(2**28)  # 2**28 float32 = 1 GiB, written: resident in THIS process
    parent_peak = peak_memory_bytes("cpu")
    del big
    result = runner.run_rung("4", tiny_base, out_dir=tmp_path, warmup=1, timeout_s=120,
                             threads=1)
    assert result["key"] == "4" and result["steps"] == 2
    assert result["pid"] != os.getpid()
    child_peak = result["peak_rss_bytes"]
    assert 0 < child_peak < parent_peak - 2**29, (child_peak, parent_peak)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_summary_excludes_warmup_steps():
    """The rung's tokens/s is the median of the steps after warm-up: a slow compile step and
    warm-up steps do not count; the first step's speed is kept separately."""
    records = [{"step": i, "loss": 5.0 - i, "tokens_per_s": tps, "peak_mem_bytes": 10 * i}
               for i, tps in enumerate([1.0, 50.0, 100.0, 110.0, 90.0])]
    s = runner.summarize_metrics(records, warmup=2)
    assert s["tokens_per_s"] == 100.0 and s["first_step_tokens_per_s"] == 1.0
    assert s["final_loss"] == 1.0 and s["loss_step0"] == 5.0 and s["peak_mem_bytes"] == 40


# Known answers: rung k runs at base * 2**e_k tokens/s (powers of two divide exactly), so its
# speedup over rung 0 must be 2**(e_k - e_0) and over its parent 2**(e_k - e_parent).
exponents = st.lists(st.integers(-6, 6), min_size=len(CPU_KEYS), max_size=len(CPU_KEYS))


@given(exponents, st.integers(1, 10**6))
def test_table_speedups_equal_known_ratios(exps, base):
    """With tokens/s = base * 2**e per rung, every row's speedup is exactly 2**(e - e_rung0) and
    its "vs the rung below" 2**(e - e_parent); the Markdown prints those numbers and the best
    rung is the one with the largest exponent."""
    e = dict(zip(CPU_KEYS, exps))
    results = [{"key": k, "tokens_per_s": base * 2.0**e[k], "first_step_tokens_per_s": 1.0,
                "tokens_per_step": 64, "loss_step0": 5.5, "final_loss": 5.0,
                "peak_rss_bytes": 2**20} for k in CPU_KEYS]
    rows = runner.ladder_table(results)
    text = runner.format_table(rows)
    for row in rows:
        rung = ladder.get_rung(row["key"])
        assert row["speedup"] == 2.0 ** (e[row["key"]] - e["0"])
        if rung.builds_on is None:
            assert row["vs_parent"] is None
        else:
            assert row["vs_parent"] == 2.0 ** (e[row["key"]] - e[rung.builds_on])
        assert f"| {2.0 ** (e[row['key']] - e['0']):.2f}x |" in text
    assert runner.best_rung(rows)["speedup"] == 2.0 ** (max(exps) - e["0"])


def test_invalid_rung_prints_no_speed():
    """Validate, then benchmark: a rung whose step-0 loss disagrees with rung 0's is flagged and
    the table shows INVALID instead of its tokens/s."""
    results = [{"key": "0", "tokens_per_s": 100.0, "first_step_tokens_per_s": 50.0,
                "tokens_per_step": 64, "loss_step0": 5.5, "final_loss": 5.0},
               {"key": "4", "tokens_per_s": 999.0, "first_step_tokens_per_s": 50.0,
                "tokens_per_step": 64, "loss_step0": 5.6, "final_loss": 5.0}]
    valid = runner.validate(results)
    assert valid["0"][0] and not valid["4"][0]
    text = runner.format_table(runner.ladder_table(results), valid=valid)
    assert "INVALID" in text and "999" not in text
    assert runner.best_rung(runner.ladder_table(results), valid=valid)["key"] == "0"


def _run_all(bench_dir, out_dir, *extra):
    """run_all.main in this process (torch is already imported); each script is a subprocess."""
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    return run_all.main(["--bench-dir", str(bench_dir), "--out-dir", str(out_dir),
                         "--timeout", "60", *extra])


def test_run_all_runs_every_script_and_propagates_failure(tmp_path):
    """run_all runs every bench_*.py even after one fails, exits non-zero if any failed, and its
    index names each script with its status; with all scripts passing it exits 0."""
    bench, out = tmp_path / "bench", tmp_path / "out"
    bench.mkdir()
    (bench / "bench_a_fails.py").write_text("import sys\nprint('boom')\nsys.exit(3)\n")
    (bench / "bench_b_ok.py").write_text(
        f"import pathlib\npathlib.Path({str(out / 'b_ok.md')!r}).parent.mkdir(exist_ok=True)\n"
        f"pathlib.Path({str(out / 'b_ok.md')!r}).write_text('ok')\n")
    assert _run_all(bench, out) == 1
    index = (out / "README.md").read_text()
    assert "bench_a_fails.py | **FAILED** (exit 3)" in index and "boom" in index
    assert "bench_b_ok.py | passed" in index and "(b_ok.md)" in index  # b ran after a failed
    summary = json.loads((out / "run_all.json").read_text())
    assert [r["passed"] for r in summary["results"]] == [False, True]
    (bench / "bench_a_fails.py").unlink()
    assert _run_all(bench, out) == 0


def test_run_all_passes_quick_to_every_script_in_its_own_process(tmp_path):
    """`run_all --quick` starts each bench_*.py as its own process with `--quick` in its argv
    (two scripts report two different process ids, both with the flag)."""
    bench, out = tmp_path / "bench", tmp_path / "out"
    bench.mkdir()
    for name in ("bench_x", "bench_y"):
        (bench / f"{name}.py").write_text(
            "import json, os, pathlib, sys\n"
            f"pathlib.Path({str(tmp_path / name)!r} + '.json').write_text("
            "json.dumps({'argv': sys.argv[1:], 'pid': os.getpid()}))\n")
    assert _run_all(bench, out, "--quick") == 0
    seen = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("bench_x", "bench_y")]
    assert [r["argv"] for r in seen] == [["--quick"], ["--quick"]]
    assert seen[0]["pid"] != seen[1]["pid"] != os.getpid()
    assert json.loads((out / "run_all.json").read_text())["quick"] is True
