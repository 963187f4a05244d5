"""The trainer data-parallel: 2 gloo ranks train exactly like one process on the whole batch."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from minitrain.distributed_utils import launch
from minitrain.train import train
from tests.trainer_helpers import tiny_config

pytestmark = [pytest.mark.trainer, pytest.mark.distributed]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny(data_bin, out_dir, **overrides):
    return tiny_config(data_bin, out_dir, **{"steps": 6, **overrides})


def _rank_train(rank, world, cfg):
    return train(cfg)


class _Killed(Exception):
    pass


def _rank_killed_then_resumed(rank, world, cfg, die_at):
    """Every rank dies just before the checkpoint at `die_at`, then resumes (same group)."""
    import minitrain.train as train_module

    real_save = train_module._save

    def dying_save(path, c, next_step, *args, **kwargs):
        if next_step == die_at:
            raise _Killed
        return real_save(path, c, next_step, *args, **kwargs)

    train_module._save = dying_save
    try:
        train(cfg)
    except _Killed:
        pass
    finally:
        train_module._save = real_save
    return train(dataclasses.replace(cfg, resume=True))


@pytest.mark.parametrize("overrides", [dict(zero_stage=0, accum_steps=2), dict(zero_stage=1),
                                       dict(zero_stage=2), dict(zero_stage=3)])
def test_two_ranks_equal_one_process_on_the_whole_batch(data_bin, tmp_path, overrides):
    """2 ranks with batch_size 4 (DDP / ZeRO 1-2-3) log the same train and val losses as one
    process with batch_size 8: each rank trains on its own half of the same global batch.
    Rank 0 alone writes metrics.jsonl (one line per step)."""
    single = train(tiny(data_bin, tmp_path / "single", batch_size=8,
                        accum_steps=overrides.get("accum_steps", 1)))
    cfg = tiny(data_bin, tmp_path / "ddp", **overrides)
    results = launch(_rank_train, 2, cfg, timeout_s=120)
    assert results[0].world_size == 2
    assert results[0].losses == pytest.approx(single.losses, rel=2e-5)
    assert results[0].final_val_loss == pytest.approx(single.final_val_loss, rel=2e-5)
    assert results[1].final_loss == pytest.approx(results[0].final_loss, rel=1e-12)
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(6))
    assert (tmp_path / "ddp" / "checkpoint.pt").exists()  # FSDP too: the full state dict
    record = json.loads(lines[-1])
    assert len(record["peak_mem_bytes_ranks"]) == 2 and min(record["peak_mem_bytes_ranks"]) > 0


def test_two_rank_zero1_resume_is_exact(data_bin, tmp_path):
    """ZeRO-1 on 2 ranks: dying before the step-6 checkpoint and resuming from step 3 gives the
    uninterrupted 2-rank run's losses exactly, one metrics line per step."""
    ref = launch(_rank_train, 2, tiny(data_bin, tmp_path / "ref", steps=8, zero_stage=1),
                 timeout_s=120)[0]
    cfg = tiny(data_bin, tmp_path / "run", steps=8, zero_stage=1)
    resumed = launch(_rank_killed_then_resumed, 2, cfg, 6, timeout_s=120)[0]
    assert resumed.start_step == 3
    assert resumed.losses == ref.losses and resumed.final_val_loss == ref.final_val_loss
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(8))


def test_torchrun_launch(data_bin, tmp_path):
    """The documented launch works: torchrun --nproc_per_node 2 -m minitrain.train ..."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "-m", "minitrain.train", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--warmup-steps", "1",
            "--eval-iters", "1", "--data", data_bin, "--out-dir", str(tmp_path), "--log-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("step 0 |") == 1  # rank 0 alone prints
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def _rank_with_nan_on_rank1(rank, world, cfg, at_step):
    """Only rank 1 sees a nan loss at `at_step`: every rank must take the same decision."""
    import torch

    import minitrain.train as train_module

    real = train_module.lm_loss
    calls = {"n": 0}

    def lm_loss(output, y):
        loss = real(output, y)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if rank == 1 and calls["n"] - 1 == at_step:
                return loss * float("nan")
        return loss

    train_module.lm_loss = lm_loss
    try:
        result = train(cfg)
    finally:
        train_module.lm_loss = real
    model = train_module.load_model(result.checkpoint_path) if rank == 0 else None
    return result.events, result.losses, model.state_dict() if model is not None else None


@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_ranks_agree_on_a_non_finite_step(data_bin, tmp_path, policy):
    """DDP on 2 ranks, a nan loss on rank 1 only at step 2: both ranks record the same event
    and action (the loss is all-reduced before the decision), nobody hangs, and the saved
    weights are finite."""
    import math

    cfg = tiny(data_bin, tmp_path, steps=5, on_nonfinite=policy)
    results = launch(_rank_with_nan_on_rank1, 2, cfg, 2, timeout_s=120)
    assert results[0][0] == results[1][0] == [(2, "non-finite loss", policy)]
    assert results[0][1][2] is None and results[0][1] == results[1][1]
    assert all(math.isfinite(float(v.abs().max())) for v in results[0][2].values())


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, sends SIGSTOP")
def test_a_stuck_rank_ends_the_job_within_its_timeout(data_bin, tmp_path):
    """torchrun, 2 ranks, --dist-timeout-s 5: SIGSTOP rank 1 mid-run. Rank 0's next collective
    gives up after ~5 s and it prints ONE line naming the stuck rank and the resume point, well
    inside the test's 90 s (without a timeout it would wait forever)."""
    import signal
    import threading
    import time

    timeout_s = 5
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "-m", "minitrain.train", "--steps", "100000", "--batch-size", "2", "--seq-len", "16",
            "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--warmup-steps", "1",
            "--eval-iters", "1", "--eval-every", "100000", "--checkpoint-every", "2",
            "--log-every", "0", "--data", data_bin, "--out-dir", str(tmp_path),
            "--dist-timeout-s", str(timeout_s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    victim = None
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        for child in _children(proc.pid):
            with open(f"/proc/{child}/environ", "rb") as f:
                if b"RANK=1" in f.read().split(b"\0"):
                    victim = child
        assert victim is not None, "".join(lines)[-2000:]
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        while time.monotonic() - stopped < 60 and not any("collective failed" in x for x in lines):
            time.sleep(0.05)
        waited = time.monotonic() - stopped
    finally:
        if victim is not None:
            os.kill(victim, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    ours = [x for x in lines if x.startswith("python -m minitrain.train:")]
    assert len(ours) == 1 and "rank 0: a collective failed" in ours[0], "".join(lines)[-2000:]
    assert "--resume continues from step" in ours[0]
    assert timeout_s - 1 < waited < timeout_s + 25, waited
