"""The trainer with the finished techniques wired in (issues 12, 13, 15, 16):
- FSDP as --zero-stage 3: a torchrun job SIGKILLed mid-run and resumed logs the uninterrupted
  losses exactly; fp16 with sharded gradients (ZeRO-2, FSDP) skips a step on every rank together;
- --profile: trace.json with the phase names, profile.md, mfu per step;
- --loader dataloader: torch's DataLoader over DistributedSampler shards (= torch's sampler),
  exact resume mid-epoch; torchrun --max-restarts: a killed worker, restarted, resumes by itself;
- --optimizer, --schedule (= torch's schedulers), --batch-warmup-steps; one-line refusals.
Uninterrupted references run as 2 ranks forked in-process (one thread each, as torchrun with
OMP_NUM_THREADS=1 here): the same numbers, without paying torchrun's start-up twice."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from minitrain.distributed_utils import launch
from tests.trainer_helpers import read_metrics

pytestmark = [pytest.mark.trainer]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def trainer_flags(data_bin, out_dir, *flags):
    """A tiny GPT on `data_bin`: the flags of every run in this file."""
    return ["--batch-size", "2", "--seq-len", "16", "--n-layer", "1", "--n-head", "2",
            "--n-embd", "16", "--warmup-steps", "2", "--eval-iters", "1", "--eval-every", "5",
            "--log-every", "1", "--data", str(data_bin), "--out-dir", str(out_dir),
            "--dist-timeout-s", "30", *flags]


def torchrun_argv(data_bin, out_dir, *flags, nproc=2, extra_launcher=()):
    """torchrun --nproc_per_node 2 -m minitrain.train with trainer_flags."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            *extra_launcher, "-m", "minitrain.train", *trainer_flags(data_bin, out_dir, *flags)]


def _rank_train(rank, world, argv):
    from minitrain.train import TrainConfig, build_parser, train
    return train(TrainConfig(**vars(build_parser().parse_args(argv)))).losses


def reference_run(data_bin, out_dir, *flags):
    """The uninterrupted run, 2 ranks forked in-process (one thread each, like torchrun with
    OMP_NUM_THREADS=1: the same numbers, without paying torchrun's start-up twice)."""
    launch(_rank_train, 2, trainer_flags(data_bin, out_dir, *flags), timeout_s=120)
    return _losses(out_dir)


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def _run(argv, timeout=120, **env):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=_env(**env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _sigkill_job(proc):
    """SIGKILL torchrun's workers (each in its own session) and torchrun itself: no clean-up."""
    for child in _children(proc.pid):
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _losses(out_dir):
    return [(m["step"], m["loss"], m.get("val_loss")) for m in read_metrics(out_dir)]


@pytest.mark.lesson18
@pytest.mark.distributed
def test_fsdp_torchrun_sigkill_and_resume_reproduces_the_losses(data_bin, tmp_path):
    """torchrun, 2 ranks, --zero-stage 3 (FSDP), fp32: SIGKILL the whole job once it is past its
    first checkpoint, then run the same command with --resume: the metrics (every step's train
    loss and every val loss) equal the uninterrupted run's EXACTLY, one line per step, and the
    resume really started from a checkpoint in the middle."""
    flags = ["--zero-stage", "3", "--steps", "10", "--checkpoint-every", "3"]
    ref = reference_run(data_bin, tmp_path / "ref", *flags)
    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_argv(data_bin, out, *flags), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT, env=_env(),
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= 4:  # past step 3's save
                break
            time.sleep(0.01)
    finally:
        _sigkill_job(proc)
    killed_at = len(metrics.read_text().splitlines())
    assert 4 <= killed_at < 10, f"the job was not killed mid-run ({killed_at} steps logged)"
    resumed = _run(torchrun_argv(data_bin, out, *flags, "--resume"))
    start = int(resumed.stdout.split("at step ")[1].split()[0])
    assert 3 <= start < 10 and start % 3 == 0, resumed.stdout[-2000:]
    assert _losses(out) == ref
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(10))


def _rank_profiled(rank, world, cfg):
    from minitrain.train import train
    return train(cfg).steps_run


@pytest.mark.lesson17
@pytest.mark.distributed
def test_profile_writes_a_trace_with_the_phases_a_report_and_mfu(data_bin, tmp_path):
    """--profile 2 on 2 gloo ranks (DDP): rank 0 writes out_dir/trace.json, a Chrome trace that
    loads as JSON and holds every phase of the step by name, communication included (the
    DDP gradient exchange is its own phase), and out_dir/profile.md with the phase table and
    the MFU; every metrics line carries an `mfu` in (0, 1)."""
    from minitrain.step_profiler import trace_names
    from tests.trainer_helpers import tiny_config

    cfg = tiny_config(data_bin, tmp_path, steps=6, profile=2)
    assert launch(_rank_profiled, 2, cfg, timeout_s=120) == [6, 6]
    names = trace_names(tmp_path / "trace.json")  # json.loads inside: it must parse
    for phase in ("data", "forward", "forward_backward", "communication", "clip", "optimizer"):
        assert any(n and n.rsplit("/", 1)[-1] == phase for n in names), (phase, sorted(names)[:40])
    report = (tmp_path / "profile.md").read_text()
    assert "Time per phase" in report and "MFU" in report and "communication" in report
    records = read_metrics(tmp_path)
    assert len(records) == 6 and all(0 < r["mfu"] < 1 for r in records)


# --- the DataLoader path (--loader dataloader) and elastic restarts --------------------------

def _small_bin(tmp_path, n_tokens=600):
    """A token file so small that a few steps cross an epoch (8 batches of 2 windows per rank)."""
    import numpy as np

    from minitrain.data import default_corpus, pretokenize
    path = tmp_path / "small.bin"
    pretokenize(default_corpus(max_bytes=20_000)[:n_tokens], path)
    assert path.stat().st_size == 2 * n_tokens and np.fromfile(path, np.uint16).max() < 256
    return path


@pytest.mark.lesson21
@pytest.mark.parametrize("num_workers", [0, 2])
def test_window_loader_reads_torch_sampler_shards_and_resumes_mid_epoch(num_workers):
    """WindowLoader on 2 ranks over 3 epochs: rank r's rows are exactly the windows
    torch.utils.data.DistributedSampler (shuffle, drop_last, seed, set_epoch) gives rank r, in
    order; the two ranks never share a window in an epoch; and a loader restored from the
    state_dict taken after any step reads exactly the batches that followed (across epochs)."""
    import numpy as np
    import torch
    from torch.utils.data import DistributedSampler as TorchDistributedSampler

    from minitrain.data import TokenWindows, WindowLoader

    tokens = np.arange(403, dtype=np.uint16) % 251  # 403 tokens: 50 windows of 8
    kw = dict(seed=5, num_workers=num_workers)
    for rank in (0, 1):
        loader = WindowLoader(tokens, 3, 8, rank=rank, world=2, **kw)
        windows = TokenWindows(tokens, 8)
        torch_sampler = TorchDistributedSampler(windows, num_replicas=2, rank=rank, shuffle=True,
                                                seed=5, drop_last=True)
        seen, states = [], []
        for epoch in range(3):
            torch_sampler.set_epoch(epoch)
            idx = list(torch_sampler)[:loader.per_epoch * 3]
            for b in range(loader.per_epoch):
                states.append(loader.state_dict())
                x, y = loader.next()  # (3, 8) each
                want = torch.stack([windows[i][0] for i in idx[3 * b:3 * b + 3]])
                assert torch.equal(x, want) and torch.equal(y[:, :-1], x[:, 1:])
                seen.append((epoch, x))
        mine = {(e, tuple(row.tolist())) for e, x in seen for row in x}
        if rank == 0:
            rank0 = mine
        else:
            assert not rank0 & mine  # disjoint shards within every epoch
        k = len(seen) // 2 + 1  # restore in the middle (epoch 1, mid-epoch)
        again = WindowLoader(tokens, 3, 8, rank=rank, world=2, **kw)
        again.load_state_dict(states[k])
        for e, x in seen[k:]:
            assert torch.equal(again.next()[0], x)


def _rank_die_before_save(rank, world, argv, die_at):
    """Every rank dies just before the checkpoint at `die_at`, then resumes (same group)."""
    import minitrain.train as train_module
    from minitrain.train import TrainConfig, build_parser, train

    cfg = TrainConfig(**vars(build_parser().parse_args(argv)))
    real_save = train_module._save

    def dying_save(path, c, next_step, *args, **kwargs):
        if next_step == die_at:
            raise KeyboardInterrupt
        return real_save(path, c, next_step, *args, **kwargs)

    train_module._save = dying_save
    try:
        train(cfg)
    except Exception:  # TrainingStopped("interrupted ...")
        pass
    finally:
        train_module._save = real_save
    import dataclasses
    return train(dataclasses.replace(cfg, resume=True)).start_step


@pytest.mark.lesson21
@pytest.mark.distributed
def test_dataloader_runs_resume_exactly_across_an_epoch(tmp_path):
    """--loader dataloader on 2 ranks (forked in-process: daemonic, so no DataLoader workers;
    the torchrun test below uses one), a token file of 8 batches per rank and epoch, 12 steps: a run stopped before its step-8 checkpoint and resumed from step 4 logs the
    uninterrupted run's losses exactly (the sampler's epoch and position are in the
    checkpoint); --log-ranks shows the two ranks read different windows (token sums differ)."""
    data = _small_bin(tmp_path)
    flags = ["--loader", "dataloader", "--steps", "12", "--checkpoint-every", "4", "--log-ranks"]
    ref = reference_run(data, tmp_path / "ref", *flags)
    argv = trainer_flags(data, tmp_path / "run", *flags)
    assert launch(_rank_die_before_save, 2, argv, 8, timeout_s=120) == [4, 4]
    assert _losses(tmp_path / "run") == ref
    records = read_metrics(tmp_path / "run")
    assert all(r["rank_token_sums"][0] != r["rank_token_sums"][1] for r in records)
    assert all(sum(r["rank_losses"]) / 2 == pytest.approx(r["loss"], rel=1e-12) for r in records)


def _worker_pid(torchrun_pid, rank):
    for child in _children(torchrun_pid):
        try:
            with open(f"/proc/{child}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return child
        except OSError:
            pass
    return None


@pytest.mark.lesson22
@pytest.mark.distributed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_elastic_restart_after_a_dead_worker_ends_with_the_uninterrupted_losses(tmp_path):
    """torchrun --max-restarts 1, 2 ranks, --loader dataloader --num-workers 1: SIGKILL rank 1
    once the run is past its first checkpoint. torchrun restarts both workers, the trainer sees
    TORCHELASTIC_RESTART_COUNT=1 and resumes from its last checkpoint by itself (same flags),
    and the job ends (exit 0, within the test's bound) with exactly the losses of the
    uninterrupted run (which read its batches without workers: workers change no number)."""
    data = _small_bin(tmp_path)
    flags = ["--loader", "dataloader", "--steps", "12", "--checkpoint-every", "4"]
    ref = reference_run(data, tmp_path / "ref", *flags)
    out = tmp_path / "elastic"
    argv = torchrun_argv(data, out, *flags, "--num-workers", "1",
                         extra_launcher=("--standalone", "--max-restarts", "1"))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=_env(), start_new_session=True)
    metrics, victim = out / "metrics.jsonl", None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None and victim is None:
            if metrics.exists() and metrics.read_text().count("\n") >= 5:
                victim = _worker_pid(proc.pid, 1)
                if victim is not None:
                    os.kill(victim, signal.SIGKILL)
            time.sleep(0.01)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            _sigkill_job(proc)
    assert victim is not None, "rank 1 was never found to be killed"
    assert proc.returncode == 0, output[-3000:]
    assert "torchrun restart 1: resuming" in output and "resumed from" in output, output[-3000:]
    assert _losses(out) == ref


# --- large batches and schedules: --optimizer, --schedule, --batch-warmup-steps

@pytest.mark.lesson26
@pytest.mark.parametrize("name", ["adamw", "lamb", "lars"])
def test_optimizer_flag_steps_like_the_optimizer_by_hand(data_bin, tmp_path, name):
    """--optimizer adamw|lamb|lars: one trainer step (no clipping, lr = max_lr) leaves the
    weights that the named optimizer (torch.optim.AdamW / minitrain's LAMB / LARS, with the
    trainer's decay groups and hyper-parameters) gives on the same first batch, by hand."""
    import numpy as np
    import torch
    from torch.optim import AdamW as TorchAdamW

    from minitrain.data import SeededBatches
    from minitrain.large_batch import LAMB, LARS
    from minitrain.train import (_load_data, build_model, lm_loss, load_model, param_groups,
                                 train)
    from tests.trainer_helpers import tiny_config

    cfg = tiny_config(data_bin, tmp_path, steps=1, warmup_steps=0, clip_norm=None,
                      optimizer=name, max_lr=3e-2, eval_iters=1)
    trained = load_model(train(cfg).checkpoint_path)
    model = build_model(cfg)
    _, train_data, _ = _load_data(cfg)
    x, y = SeededBatches(train_data, cfg.batch_size, cfg.seq_len,
                         rng=np.random.default_rng(cfg.seed)).next()  # (B, T) each
    lm_loss(model(x), y).backward()
    groups = param_groups(model, cfg.weight_decay)
    opt = {"adamw": lambda: TorchAdamW(groups, lr=cfg.max_lr, betas=(0.9, 0.95), eps=1e-8,
                                       foreach=False),
           "lamb": lambda: LAMB(groups, lr=cfg.max_lr, betas=(0.9, 0.95), eps=1e-8),
           "lars": lambda: LARS(groups, lr=cfg.max_lr, momentum=0.9)}[name]()
    opt.step()
    for (key, want), got in zip(model.state_dict().items(), trained.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=key)


def _torch_lrs(make, max_lr, steps):
    """The lr of every step under a torch scheduler (read before each step, as the trainer)."""
    import torch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=max_lr)
    sched = make(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.lesson27
@pytest.mark.parametrize("schedule", ["step", "one-cycle", "constant", "inverse-sqrt"])
def test_schedule_flag_lrs_equal_torch_schedulers(schedule, data_bin, tmp_path):
    """--schedule without warmup logs, step for step, the lr of torch's scheduler: StepLR
    (step_size = a third of the steps, gamma = sqrt(min_lr / max_lr)), OneCycleLR
    (pct_start 0.3), a constant LambdaLR, and the Transformer's inverse square root
    (LambdaLR with min((n)/W, sqrt(W / n)), n = step + 1, W = 1). With --warmup-steps W every
    schedule but one-cycle starts with the cosine's linear warmup (step + 1) / W * max_lr."""
    import math

    from torch.optim import lr_scheduler as torch_sched

    from minitrain.train import train
    from tests.trainer_helpers import tiny_config

    steps, max_lr, min_lr = 9, 1e-3, 1e-5
    make = {"step": lambda o: torch_sched.StepLR(o, step_size=3, gamma=math.sqrt(min_lr / max_lr)),
            "one-cycle": lambda o: torch_sched.OneCycleLR(o, max_lr=max_lr, total_steps=steps,
                                                          pct_start=0.3, cycle_momentum=False),
            "constant": lambda o: torch_sched.LambdaLR(o, lambda s: 1.0),
            "inverse-sqrt": lambda o: torch_sched.LambdaLR(
                o, lambda s: min(s + 1, math.sqrt(1 / (s + 1))))}[schedule]
    got = train(tiny_config(data_bin, tmp_path / "a", steps=steps, warmup_steps=0,
                            max_lr=max_lr, min_lr=min_lr, schedule=schedule)).lrs
    assert got == pytest.approx(_torch_lrs(make, max_lr, steps), rel=1e-12)
    if schedule != "one-cycle":
        warm = train(tiny_config(data_bin, tmp_path / "b", steps=steps, warmup_steps=3,
                                 max_lr=max_lr, min_lr=min_lr, schedule=schedule)).lrs
        assert warm[:3] == pytest.approx([max_lr / 3, 2 * max_lr / 3, max_lr], rel=1e-12)


@pytest.mark.lesson26
def test_batch_warmup_ramps_micro_batches_and_the_schedule_counts_steps(data_bin, tmp_path):
    """--accum-steps 4 --batch-warmup-steps 4: steps 0..5 use 1, 1, 2, 3, 4, 4 micro-batches
    (1 + 3 * step // 4), logged with their tokens; step 0's loss is the loss of a 1-micro-batch
    run's step 0 (the same first batch); the lr of every step equals the run without a ramp
    (the schedule counts optimizer steps, not tokens)."""
    from minitrain.train import train
    from tests.trainer_helpers import tiny_config

    ramp = train(tiny_config(data_bin, tmp_path / "ramp", steps=6, accum_steps=4,
                             batch_warmup_steps=4))
    records = read_metrics(tmp_path / "ramp")
    assert [r["micro_batches"] for r in records] == [1, 1, 2, 3, 4, 4]
    assert [r["tokens"] for r in records] == [n * 4 * 32 for n in (1, 1, 2, 3, 4, 4)]
    one = train(tiny_config(data_bin, tmp_path / "one", steps=6, accum_steps=1))
    assert ramp.losses[0] == one.losses[0] and ramp.lrs == one.lrs


# --- fp16 with sharded gradients (ZeRO-2, FSDP) -------------------------------------

def _rank_fp16_inf_on_rank1(rank, world, cfg, at_step):
    """fp16 run; with at_step set, rank 1 alone finds an inf in its gradient part at at_step."""
    import minitrain.fsdp as fsdp_module
    import minitrain.zero as zero_module
    from minitrain.train import train
    from tests.trainer_helpers import read_metrics as read

    cls, name = ((zero_module.ZeroOptimizer, "reduce_gradients") if cfg.zero_stage == 2 else
                 (fsdp_module.FSDP, "finish_gradient_synchronization"))
    real, calls = getattr(cls, name), {"n": 0}

    def poisoned(self, *args, **kwargs):
        fresh = not getattr(self, "_reduced", False)  # ZeRO-2's step() calls it again: no-op
        out = real(self, *args, **kwargs)
        calls["n"] += fresh
        if fresh and rank == 1 and calls["n"] - 1 == at_step:
            params = self._params if cfg.zero_stage == 2 else list(self.parameters())
            grad = next(p.grad for p in params if p.grad is not None)
            grad.view(-1)[0] = float("inf")
        return out

    setattr(cls, name, poisoned)
    try:
        result = train(cfg)
    finally:
        setattr(cls, name, real)
    skipped = [r["skipped"] for r in read(cfg.out_dir)] if rank == 0 else None
    return result.skipped_steps, skipped, all(v is not None for v in result.losses)


@pytest.mark.lesson18
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_fp16_with_sharded_gradients_skips_on_every_rank_together(data_bin, tmp_path, stage):
    """--precision fp16 with --zero-stage 2 / 3 (no longer refused): when only rank 1's gradient
    part holds an inf at step 3, found-inf is agreed across ranks, so rank 0 (whose own part is
    finite) skips step 3 too: both ranks count the same skipped steps, the metrics show step 3
    skipped where the clean run did not skip it, and every logged loss stays finite."""
    from tests.trainer_helpers import tiny_config

    def cfg(name):
        return tiny_config(data_bin, tmp_path / name, steps=5, precision="fp16",
                           zero_stage=stage, checkpoint_every=5)
    clean = launch(_rank_fp16_inf_on_rank1, 2, cfg("clean"), None, timeout_s=120)
    poisoned = launch(_rank_fp16_inf_on_rank1, 2, cfg("poisoned"), 3, timeout_s=120)
    assert clean[0][1][3] is False
    assert poisoned[0][1][3] is True
    assert poisoned[0][0] == poisoned[1][0] == clean[0][0] + 1
    assert all(r[2] for r in clean + poisoned)


@pytest.mark.parametrize("overrides, world, field", [
    (dict(num_workers=1), 1, "num_workers"),  # DataLoader knob without --loader dataloader
    (dict(loader="dataloader", prefetch_factor=2), 1, "prefetch_factor"),  # needs workers
    (dict(loader="dataloader", persistent_workers=True), 1, "persistent_workers"),
    (dict(batch_warmup_steps=3), 1, "batch_warmup_steps"),  # accum_steps 1: nothing to ramp
    (dict(optimizer="lamb", zero_stage=3), 2, "optimizer"),
    (dict(optimizer="lars", fused_adamw=True), 1, "fused_adamw"),
    (dict(compile=True, zero_stage=3), 2, "compile"),
    (dict(schedule="linear"), 1, "schedule"),
])
def test_new_flags_refuse_what_would_not_work_naming_the_flag(overrides, world, field):
    """Each combination that cannot work is ONE ConfigError naming its field (the CLI prints
    it as --flag-name), before any work starts; fp16 with ZeRO-2/FSDP is no longer refused."""
    from minitrain.train_config import ConfigError, TrainConfig, validate_config

    with pytest.raises(ConfigError) as err:
        validate_config(TrainConfig(**overrides), world_size=world)
    assert err.value.field == field
    for stage in (2, 3):
        validate_config(TrainConfig(precision="fp16", zero_stage=stage), world_size=2)
