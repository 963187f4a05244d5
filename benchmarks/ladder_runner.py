"""Measuring the speed ladder: train each rung, validate it, then tabulate the measured speeds.

What: the rungs themselves (one `TrainConfig` change each) are data in `minitrain.ladder`; this
module is the tooling that measures them, shared by `benchmarks/bench_ladder.py`, lesson 11 and
the `speed_ladder` animation:
- `train_rung(key, base, out_dir=...)` trains rung `key` IN THIS PROCESS with
  `minitrain.train.train` and reduces its `metrics.jsonl` to one summary (`summarize_metrics`);
- `run_rung(...)` does the same in a FRESH Python process (`python -m benchmarks.ladder_runner`),
  so peak RSS, allocator state, compile caches and thread pools are that rung's own;
- `validate(results)` checks each rung's step-0 loss against rung 0's before any speed is shown;
- `ladder_table`, `format_table`, `best_rung` turn measured summaries into the Markdown table.

Why: validate first, then benchmark (the llm.c habit). Every rung starts from the same seed, the
same initialization and the same first batch, so its step-0 loss must equal rung 0's (tight for
fp32 rungs, loose for bf16/fp16, looser for the larger batch). A rung that fails prints no speed.

Formula (per rung, from metrics.jsonl):
    tokens/s    = median over steps >= warmup of the per-step tokens_per_s
                  (warm-up and compile steps excluded; the first step's speed is kept apart)
    peak memory = the process's peak resident set (`minitrain.bench.peak_memory_bytes`)
    speedup     = tokens/s / rung 0's tokens/s;   vs_parent = tokens/s / the parent rung's

When it helps: `make bench` (a fresh process per rung, memory comparable); lesson 11 and the
animation train in one process for speed and so leave the memory column out.

Common bug: measuring rungs one after the other in one process and reading their peak memory:
the peak is a high-water mark, so every later rung reports the max of all earlier ones.
"""
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

from minitrain.bench import peak_memory_bytes
from minitrain.files import read_jsonl
from minitrain.ladder import EXTRA_KEYS, get_rung, rung_overrides


def prepare_data(path, *, max_bytes=4_000_000):
    """Pretokenize `max_bytes` of the default corpus to `path` once; every rung reads this file."""
    from minitrain import data

    path = pathlib.Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        data.pretokenize(data.default_corpus(max_bytes=max_bytes), path)
    return str(path)


def summarize_metrics(records, *, warmup):
    """Reduce train's per-step metrics to one rung's numbers (pure; used on metrics.jsonl)."""
    if not records:
        raise ValueError("records is empty: the run wrote no metrics lines")
    records = sorted(records, key=lambda r: r["step"])
    timed = records[warmup:] or records[-1:]  # a 2-step smoke run still gets a number
    tps = [r["tokens_per_s"] for r in timed]
    peaks = [r.get("peak_mem_bytes") or 0 for r in records]
    return {"tokens_per_s": statistics.median(tps), "tokens_per_s_worst": min(tps),
            "tokens_per_s_best": max(tps), "timed_steps": len(timed),
            "first_step_tokens_per_s": records[0]["tokens_per_s"],
            "loss_step0": records[0]["loss"], "final_loss": records[-1]["loss"],
            "steps": len(records), "peak_mem_bytes": max(peaks),
            "skipped_steps": sum(bool(r.get("skipped")) for r in records)}


def train_rung(key, base, *, out_dir, warmup=4):
    """Train rung `key` IN THIS PROCESS and return its summary (run_rung wraps it in a process)."""
    import torch

    from minitrain.train import TrainConfig, train

    config = rung_overrides(key, base)
    config["out_dir"] = str(out_dir)
    extras = {k: config.pop(k) for k in EXTRA_KEYS if k in config}
    if "tf32" in extras:  # TF32 matmuls on tensor cores (CUDA only; a no-op on CPU)
        torch.set_float32_matmul_precision("high" if extras["tf32"] else "highest")
    t0 = time.perf_counter()
    result = train(TrainConfig(**config))
    wall_s = time.perf_counter() - t0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on the box
    summary = summarize_metrics(read_jsonl(pathlib.Path(out_dir) / "metrics.jsonl"),
                                warmup=warmup)
    summary.update(key=key, name=get_rung(key).name, wall_s=wall_s, load_avg_1min=load,
                   peak_rss_bytes=peak_memory_bytes("cpu"), pid=os.getpid(),
                   final_val_loss=getattr(result, "final_val_loss", None),
                   tokens_per_step=config["batch_size"] * config["seq_len"]
                   * config.get("accum_steps", 1),
                   threads=torch.get_num_threads(),
                   config={**{k: v for k, v in config.items() if k != "out_dir"}, **extras})
    return summary


def run_rung(key, base, *, out_dir, warmup=4, timeout_s=600, threads=None):
    """Train and measure rung `key` in a fresh Python process; returns its summary dict."""
    get_rung(key)
    request = {"key": str(key), "base": base, "out_dir": str(out_dir), "warmup": warmup,
               "threads": threads}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ladder_runner", json.dumps(request)],
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LADDER_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"rung {key} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("LADDER_RESULT "))


def validate(results, *, reference_key="0"):
    """Check each rung's step-0 loss against the reference rung's; returns {key: (ok, reason)}.

    Same seed + same init + same first batch => the same loss before any update, up to the
    rung's tolerance (rounding of bf16/fp16; a larger batch sees more rows)."""
    by_key = {r["key"]: r for r in results}
    if reference_key not in by_key:
        raise ValueError(f"results must include the reference rung {reference_key!r}")
    ref = by_key[reference_key]["loss_step0"]
    verdicts = {}
    for r in results:
        tol = get_rung(r["key"]).tolerance
        numbers = (ref, r["loss_step0"], r["final_loss"], r["tokens_per_s"])
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
            verdicts[r["key"]] = (False, "a loss or the speed is not a finite number")
            continue
        err = abs(r["loss_step0"] - ref) / abs(ref)
        verdicts[r["key"]] = (err <= tol, f"step-0 loss rel. diff {err:.1e} (tolerance {tol:.0e})")
    return verdicts


def ladder_table(results, *, reference_key="0"):
    """Rows with speedup and memory ratio vs the reference rung, computed from `results` (pure)."""
    by_key = {r["key"]: r for r in results}
    if reference_key not in by_key:
        raise ValueError(f"results must include the reference rung {reference_key!r}")
    ref = by_key[reference_key]
    rows = []
    for r in results:
        rung = get_rung(r["key"])
        row = dict(r)
        row["name"] = rung.name
        row["note"] = r.get("note", rung.note)
        if r.get("skipped_steps"):  # fp16: the GradScaler skipped updates with inf/nan grads
            row["note"] += f" ({r['skipped_steps']} steps skipped by the GradScaler)"
        row["speedup"] = r["tokens_per_s"] / ref["tokens_per_s"]
        parent = by_key.get(rung.builds_on) if rung.builds_on else None
        row["vs_parent"] = r["tokens_per_s"] / parent["tokens_per_s"] if parent else None
        if r.get("peak_rss_bytes") and ref.get("peak_rss_bytes"):
            row["mem_ratio"] = r["peak_rss_bytes"] / ref["peak_rss_bytes"]
        rows.append(row)
    return rows


def format_table(rows, *, valid=None, memory=True):
    """Markdown table; a rung whose validation failed shows INVALID instead of its speed.

    `memory=False` drops the peak-memory column (rungs measured in one process share a peak)."""
    head = ["rung", "change", "tokens/s", "speedup vs 0", "vs the rung below", "best step tok/s",
            "first step s", "peak mem MB", "loss after N steps", "load avg", "note"]
    if not memory:
        head.remove("peak mem MB")
    lines = ["| " + " | ".join(head) + " |",
             "|---|---|" + "---:|" * (len(head) - 3) + "---|"]
    for row in rows:
        ok = True if valid is None else valid.get(row["key"], (False, ""))[0]
        first = row["tokens_per_step"] / row["first_step_tokens_per_s"] \
            if row.get("tokens_per_step") else float("nan")
        mem = (row.get("peak_mem_bytes") or row.get("peak_rss_bytes") or 0) / 2**20
        cells = [row["key"], row["name"],
                 f"{row['tokens_per_s']:,.0f}" if ok else "INVALID",
                 f"{row['speedup']:.2f}x" if ok else "-",
                 f"{row['vs_parent']:.2f}x" if ok and row.get("vs_parent") else "-",
                 f"{row['tokens_per_s_best']:,.0f}" if ok and row.get("tokens_per_s_best")
                 else "-",
                 f"{first:.2f}", f"{mem:,.0f}", f"{row['final_loss']:.4f}",
                 f"{row['load_avg_1min']:.1f}" if row.get("load_avg_1min") is not None else "-",
                 row["note"]]
        if not memory:
            del cells[7]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_rung(rows, *, valid=None):
    """The valid row with the highest speedup."""
    ok_rows = [r for r in rows if valid is None or valid.get(r["key"], (False,))[0]]
    if not ok_rows:
        raise ValueError("rows has no valid rung")
    return max(ok_rows, key=lambda r: r["speedup"])


def _worker(request):
    import torch

    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    summary = train_rung(request["key"], request["base"], out_dir=request["out_dir"],
                         warmup=request["warmup"])
    print("LADDER_RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":  # the subprocess side of run_rung
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m benchmarks.ladder_runner '<json request>' "
                         "(used by run_rung)")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    _worker(json.loads(sys.argv[1]))
