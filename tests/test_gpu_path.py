"""The GPU ladder's code, run on the CPU so it cannot rot before a GPU is lent.

`benchmarks/bench_ladder.py` runs the GPU ladder (minitrain.ladder.GPU_RUNGS: TF32, SDPA, bf16,
fused AdamW, torch.compile, larger batch) only where CUDA is available, and reports tokens/s and
MFU. Here the SAME pieces run with device="cpu" on a tiny model: the rung chain
(`ladder.rung_overrides`), `ladder_runner.train_rung` (the TF32 flag, the TrainConfig each rung
builds, the trainer under bf16 / fused AdamW / compile), `ladder_runner.validate` with the GPU
rungs' tolerances, and `bench_ladder.section` with a GPU name (the MFU column).

What cannot run here: `bench_ladder.main`'s `if use_gpu:` block itself (it builds the GPU base
inline and `run_rung` starts subprocesses whose rung g0 forces device="cuda"). Rung g0's
`device: "cuda"` is swapped for "cpu" by wrapping `ladder_runner.rung_overrides`; everything
else is the code `make bench` runs on a GPU.

Compile rung (g5): inductor is swapped for the "aot_eager" backend, as in tests/test_ladder.py
(dynamo still traces the model under autocast; a cold inductor compile costs about a minute on
2 busy cores). MINITRAIN_TEST_INDUCTOR=1 uses the real inductor.
"""
import functools
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import bench_ladder
from benchmarks import ladder_runner as runner
from minitrain import ladder
from minitrain.train import TrainConfig, build_model

pytestmark = pytest.mark.lesson11
GPU_KEYS = [r.key for r in ladder.GPU_RUNGS]
# GPU_MODEL's keys at a CPU-sized shape (GPT-2 small is 12 x 768 at T=1024)
TINY_GPU_MODEL = dict(bench_ladder.GPU_MODEL, batch_size=2, seq_len=32, n_layer=1, n_head=2,
                      n_embd=32, steps=2)
assert set(TINY_GPU_MODEL) == set(bench_ladder.GPU_MODEL)


@pytest.fixture(scope="module")
def gpu_results_on_cpu(tmp_path_factory):
    """Every GPU rung trained by ladder_runner.train_rung with device="cpu" (one process)."""
    data = runner.prepare_data(tmp_path_factory.mktemp("gpu") / "tokens.bin", max_bytes=40_000)
    base = ladder.default_base(**TINY_GPU_MODEL, data=data, warmup_steps=1)  # as main() builds it
    on_cpu = functools.wraps(ladder.rung_overrides)(
        lambda key, b: {**ladder.rung_overrides(key, b), "device": "cpu"})
    mp = pytest.MonkeyPatch()
    mp.setattr(runner, "rung_overrides", on_cpu)
    if os.environ.get("MINITRAIN_TEST_INDUCTOR") != "1":
        mp.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    precision = torch.get_float32_matmul_precision()  # the tf32 rung sets a global flag
    try:
        results = [runner.train_rung(k, base, out_dir=tmp_path_factory.mktemp(k), warmup=1)
                   for k in GPU_KEYS]
    finally:
        torch.set_float32_matmul_precision(precision)
        mp.undo()
    return base, results


def test_every_gpu_rung_trains_on_cpu_and_carries_its_change(gpu_results_on_cpu):
    """Each GPU rung trains its steps with finite losses on the CPU, and its config holds the
    change it declares (g6 doubles the batch) on top of every earlier rung's change."""
    base, results = gpu_results_on_cpu
    assert [r["key"] for r in results] == GPU_KEYS
    for r in results:
        assert r["steps"] == base["steps"] and math.isfinite(r["final_loss"]), r["key"]
        assert r["config"]["device"] == "cpu"
        for name, value in ladder.get_rung(r["key"]).change.items():
            if name == "device":
                continue
            parent = ladder.rung_overrides(ladder.get_rung(r["key"]).builds_on or "g0", base)
            expected = value(parent[name]) if callable(value) else value
            assert r["config"][name] == expected, (r["key"], name)
    last = results[-1]["config"]
    assert last["batch_size"] == 2 * base["batch_size"] and last["compile"] and \
        last["fused_adamw"] and last["precision"] == "bf16" and last["tf32"]


PEAK = 2.0 ** 40  # a known "measured" peak (FLOP/s), so the expected MFU is exact arithmetic


def test_gpu_section_validates_and_reports_mfu(gpu_results_on_cpu):
    """bench_ladder.section, given a GPU's name, validates every rung's step-0 loss against g0's
    (within the rung's tolerance) and adds MFU = tokens/s * flops_per_token / the measured peak,
    and the same against the GPU's datasheet bf16 peak; the table's note prints both."""
    base, results = gpu_results_on_cpu
    sheet = bench_ladder.vendor_peak_flops("NVIDIA H200", torch.bfloat16)
    assert sheet is not None
    md, data, ok = bench_ladder.section("GPU ladder (cpu stand-in)", GPU_KEYS, base, results, {},
                                        warmup=1, peak=PEAK, peak_dtype=torch.bfloat16,
                                        gpu_name="NVIDIA H200")
    assert ok, md
    assert [r["key"] for r in data["rows"]] == GPU_KEYS
    for row in data["rows"]:
        assert row["valid"], row["validation"]
        achieved = row["tokens_per_s"] * bench_ladder.flops_per_token(dict(row["config"]))
        assert row["mfu"] == pytest.approx(achieved / PEAK, rel=1e-12) and row["mfu"] > 0
        assert row["mfu_datasheet"] == pytest.approx(achieved / sheet, rel=1e-12)
        assert f"MFU {row['mfu']:.1%}" in row["note"]
        assert f"{row['mfu_datasheet']:.1%} of the datasheet bf16 peak" in row["note"]
    assert "| g5 |" in md and "Best rung" in md


def test_unknown_gpu_has_no_datasheet_mfu(gpu_results_on_cpu):
    """A GPU missing from the datasheet table gets mfu_datasheet None and says so, instead of
    some other GPU's peak (the measured-peak MFU is still there)."""
    base, results = gpu_results_on_cpu
    _, data, _ = bench_ladder.section("x", GPU_KEYS, base, results, {}, warmup=1, peak=PEAK,
                                      peak_dtype=torch.bfloat16, gpu_name="Some Future GPU")
    assert bench_ladder.vendor_peak_flops("Some Future GPU", torch.bfloat16) is None
    assert all(r["mfu_datasheet"] is None and "datasheet peak unknown" in r["note"]
               and r["mfu"] > 0 for r in data["rows"])


@settings(max_examples=6)
@given(st.integers(1, 3), st.sampled_from([16, 32, 48]), st.sampled_from([8, 24, 64]))
def test_flops_per_token_counts_the_models_parameters(n_layer, n_embd, seq_len):
    """flops_per_token = 6 N + 12 L C T where N is the real GPT's parameter count without the
    position embedding (nanoGPT's convention), for any depth, width and context."""
    cfg = dict(n_layer=n_layer, n_embd=n_embd, seq_len=seq_len)
    model = build_model(TrainConfig(n_layer=n_layer, n_head=2, n_embd=n_embd, seq_len=seq_len))
    n = sum(p.numel() for p in model.parameters()) - seq_len * n_embd  # minus wpe
    expected = 6 * n + 12 * n_layer * n_embd * seq_len
    assert bench_ladder.flops_per_token(dict(cfg, n_head=2)) == expected
