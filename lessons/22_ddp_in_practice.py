"""Lesson 22 — DDP in practice: launch it right, know your batch, survive a dead worker.

Objective: lesson 13 built DDP; this one RUNS it the way a real job does, with torchrun and
minitrain's trainer, and checks the five things the deck's run-discipline slide asks for:
  1. the effective batch: tokens per optimizer step = micro_batch x seq_len x accum x world,
     checked against what the trainer logs, for 1 and 2 processes: its run header's global
     batch, every log line's step time x tokens/s, and (--log-ranks) each rank's own tokens;
  2. the data shards: which samples each rank visits (minitrain.sampler.DistributedSampler, =
     torch's), printed per rank: they differ, and together they cover the data set; and the
     trainer's per-rank losses at step 0 (--log-ranks), which differ because the rows do;
  3. the plain-`python` mistake: WORLD_SIZE=2 without torchrun's rendezvous is refused with ONE
     line (shown) instead of one process silently training alone;
  4. fault tolerance: under `torchrun --max-restarts 1` one worker is SIGKILLed mid-run; torchrun
     restarts the group, the trainer's `--resume` continues from its last checkpoint (the same
     command line: `--resume` without a checkpoint starts at step 0), and every logged loss equals
     the uninterrupted run's, bit for bit;
  5. scaling efficiency: tokens/s for 1 and 2 processes on the same per-process work,
     efficiency = T_2 / (2 T_1).

Honest note on 5: this machine has 2 cores. Each process gets ONE thread (OMP_NUM_THREADS=1 for
both runs, so the comparison is fair), the gradients travel over loopback TCP (gloo), and every
other program on the box competes for the same two cores. An efficiency near 1 would mean the
all-reduce is cheap next to the step; on a loaded 2-core box it mostly measures the load. On
GPUs the same formula is the number to watch (NCCL over NVLink: typically 0.9+ for 8 GPUs).

Serves: deck slides 10 (DDP benefits and costs: torchrun, sampler, batch semantics, per-rank
logging, single-process fallback) and 20 (DDP run discipline), M8-LAB-04; syllabus 16-08
(DistributedSampler, launch scripts, fault tolerance, scaling efficiency).
Prerequisites: lessons 01 (batches), 06 (accumulation), 13 (DDP three ways).

Run: python lessons/22_ddp_in_practice.py   (35-52 s measured on 2 busy cores: it starts 7
Python processes; figure and results.json in outputs/lesson22/)
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import matplotlib.pyplot as plt
from torch.utils.data import DistributedSampler as TorchDistributedSampler

from minitrain.files import read_jsonl
from minitrain.sampler import DistributedSampler
from minitrain.style import BACKGROUND, GOLD, MUTED, NAVY, PANEL, RED, outputs_dir

OUT = outputs_dir("lesson22")
ROOT = OUT.parent.parent
MICRO, SEQ, ACCUM = 4, 64, 2  # micro-batch per rank, tokens per row, micro-batches per step
STEPS, CKPT_EVERY, KILL_AFTER = 24, 8, 10  # kill once >= KILL_AFTER steps are logged
TRAIN_FLAGS = ["--steps", str(STEPS), "--batch-size", str(MICRO), "--seq-len", str(SEQ),
               "--accum-steps", str(ACCUM), "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
               "--warmup-steps", "4", "--eval-every", "12", "--eval-iters", "2",
               "--checkpoint-every", str(CKPT_EVERY), "--log-every", "1",
               "--corpus-bytes", "300000", "--device", "cpu", "--dist-timeout-s", "30"]
LOG_LINE = re.compile(r"^step (\d+) \| .* \| (\d+) ms \| ([\d,]+) tok/s")
HEADER = re.compile(r"^world size .* = ([\d,]+) tokens/step")  # the trainer's run header
RANK_LINE = re.compile(r"^\s+rank (\d+) \| loss ([\d.]+) \| (\d+) tokens")  # --log-ranks
TIMEOUT_S = 150


def clean_env(**extra):
    """The environment without any torchrun variables, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def trainer_argv(world, out_dir, *extra, flags=()):
    """`python -m minitrain.train` (world 1) or torchrun --standalone (a free port: no clash)."""
    launcher = [] if world == 1 else ["-m", "torch.distributed.run", "--standalone",
                                      "--nproc_per_node", str(world), *extra]
    return [sys.executable, *launcher, "-m", "minitrain.train", *TRAIN_FLAGS, *flags,
            "--out-dir", str(out_dir), "--overwrite"]


def run_trainer(world, name, flags=()):
    out_dir = OUT / name
    proc = subprocess.run(trainer_argv(world, out_dir, flags=flags), capture_output=True, text=True,
                          cwd=ROOT, env=clean_env(), timeout=TIMEOUT_S)
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("python -m minitrain.train")]
    assert proc.returncode == 0, "\n".join(ours) or proc.stderr[-3000:]
    return proc.stdout, read_jsonl(out_dir / "metrics.jsonl")


def logged_tokens_per_step(stdout):
    """Per step, the interval [lo, hi] holding (step ms) x (tok/s) of the trainer's log line:
    both are printed rounded, so the true product lies within +-0.5 of each printed number."""
    out = []
    for line in stdout.splitlines():
        m = LOG_LINE.match(line)
        if m:
            ms, tps = int(m.group(2)), int(m.group(3).replace(",", ""))
            out.append(((ms - 0.5) * (tps - 0.5) / 1000, (ms + 0.5) * (tps + 0.5) / 1000))
    return out


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def rank_pid(agent_pid, rank):
    for child in children(agent_pid):
        try:
            with open(f"/proc/{child}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return child
        except OSError:
            pass
    return None


def killed_and_restarted_run():
    """torchrun --max-restarts 1 ... --resume; SIGKILL rank 1 after KILL_AFTER logged steps."""
    out_dir = OUT / "killed"
    shutil.rmtree(out_dir, ignore_errors=True)
    argv = trainer_argv(2, out_dir, "--max-restarts", "1", "--monitor-interval", "0.2")
    argv[argv.index("--overwrite")] = "--resume"  # the SAME command before and after a restart
    log_path = OUT / "killed_log.txt"
    metrics = out_dir / "metrics.jsonl"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=clean_env(), start_new_session=True)
        killed_at, victim = None, None
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline and proc.poll() is None and victim is None:
                if metrics.exists() and metrics.read_text().count("\n") >= KILL_AFTER:
                    victim = rank_pid(proc.pid, 1)
                    if victim is not None:
                        os.kill(victim, signal.SIGKILL)  # no clean-up: a crash, an OOM kill
                        killed_at = metrics.read_text().count("\n")
                time.sleep(0.01)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:  # never leave a hung job behind
                for child in children(proc.pid):
                    os.kill(child, signal.SIGKILL)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    text = log_path.read_text()
    assert proc.returncode == 0, \
        f"the restarted job failed (exit {proc.returncode}):\n{text[-3000:]}"
    assert killed_at is not None and killed_at < STEPS, "the run ended before it could be killed"
    return killed_at, text, read_jsonl(metrics)


def plain_python_mistake():
    """WORLD_SIZE=2 without torchrun: the trainer must refuse, in ONE stderr line, exit 2."""
    env = clean_env(WORLD_SIZE="2", RANK="0")
    return subprocess.Popen([sys.executable, "-m", "minitrain.train", *TRAIN_FLAGS, "--out-dir",
                             str(OUT / "mistake"), "--overwrite"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def show_shards(num_samples, world, *, drop_last=False, epoch=0):
    shards = []
    for rank in range(world):
        ours = DistributedSampler(num_samples, num_replicas=world, rank=rank, seed=0,
                                  drop_last=drop_last)
        theirs = TorchDistributedSampler(range(num_samples), num_replicas=world, rank=rank,
                                         seed=0, drop_last=drop_last)
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        shards.append(list(ours))
        assert shards[-1] == list(theirs), "minitrain's sampler must equal torch's"
        print(f"  {num_samples} samples, {world} ranks, drop_last={drop_last}, epoch {epoch}: "
              f"rank {rank} -> {shards[-1]}")
    return shards


def main():
    t_start = time.perf_counter()
    mistake = plain_python_mistake()  # start it now: it only has to import torch and refuse

    print("== 2. the data each rank sees (DistributedSampler, equal to torch's) ==")
    even = show_shards(10, 2)
    assert not set(even[0]) & set(even[1]), "ranks must not share samples"
    assert sorted(even[0] + even[1]) == list(range(10)), "together they cover the data"
    padded = show_shards(10, 3)  # 10 is not divisible by 3: padded by wrapping around
    flat = [i for s in padded for i in s]
    assert len(flat) == 12 and set(flat) == set(range(10)), "padding repeats 2 samples"
    dropped = show_shards(10, 3, drop_last=True)
    assert sum(map(len, dropped)) == 9, "drop_last drops the tail instead"
    next_epoch = show_shards(10, 2, epoch=1)
    assert next_epoch != even, "set_epoch(1) reshuffles; a rank that forgets it repeats epoch 0"
    print("  (the trainer itself gives rank r rows r*B..(r+1)*B-1 of one seeded global batch: "
          "minitrain.data.rank_rows)")

    print("\n== 3. the plain-python mistake ==")
    _, err = mistake.communicate(timeout=TIMEOUT_S)
    err_lines = [ln for ln in err.splitlines() if ln.strip()]
    print(f"  $ WORLD_SIZE=2 RANK=0 python -m minitrain.train ...   (exit {mistake.returncode})")
    for ln in err_lines:
        print(f"  {ln}")
    assert mistake.returncode == 2 and len(err_lines) == 1 and "torchrun" in err_lines[0], err
    assert not (OUT / "mistake" / "metrics.jsonl").exists(), "nothing may be trained alone"

    print("\n== 1 and 5. effective batch and scaling (1 vs 2 processes, 1 thread each) ==")
    runs = {}
    for world in (1, 2):
        stdout, records = run_trainer(world, f"world{world}",
                                      flags=("--log-ranks",) if world > 1 else ())
        predicted = MICRO * SEQ * ACCUM * world
        header = [ln for ln in stdout.splitlines() if HEADER.match(ln)]
        if header:  # the run header states the global batch: it must be the arithmetic's
            print(f"  trainer header: {header[0]}")
            assert int(HEADER.match(header[0]).group(1).replace(",", "")) == predicted
        if world > 1:  # --log-ranks: each rank's own loss and tokens, step 0
            ranks = [RANK_LINE.match(ln) for ln in stdout.splitlines() if RANK_LINE.match(ln)]
            first = ranks[:world]
            for m in first:
                print(f"  step 0, rank {m.group(1)}: loss {m.group(2)} on {m.group(3)} tokens")
            assert len(ranks) == world * STEPS, "one --log-ranks line per rank and step"
            assert sum(int(m.group(3)) for m in first) == predicted, "the ranks' tokens add up"
            assert len({m.group(2) for m in first}) == world, "different shards, different losses"
        bounds = logged_tokens_per_step(stdout)
        assert len(bounds) == STEPS, f"expected {STEPS} log lines, got {len(bounds)}"
        bad = [b for b in bounds if not b[0] <= predicted <= b[1]]
        assert not bad, f"world {world}: logged ms x tok/s {bad[0]} != {predicted} tokens/step"
        timed = sorted(r["tokens_per_s"] for r in records[4:])  # warm-up steps excluded
        runs[world] = {"records": records, "tokens_per_step": predicted,
                       "tokens_per_s": timed[len(timed) // 2]}
        print(f"  world {world}: {MICRO} x {SEQ} x {ACCUM} x {world} = {predicted} tokens/step "
              f"(all {STEPS} log lines agree: ms x tok/s), median "
              f"{runs[world]['tokens_per_s']:,.0f} tok/s over all processes, "
              f"{runs[world]['tokens_per_s'] / world:,.0f} per process")
    eff = runs[2]["tokens_per_s"] / (2 * runs[1]["tokens_per_s"])
    load = os.getloadavg()[0]
    print(f"  scaling efficiency T_2 / (2 T_1) = {eff:.2f}   (1-min load average {load:.1f} on "
          f"{os.cpu_count()} cores: other work shares them)")

    print("\n== 4. a worker killed, torchrun restarts it, the trainer resumes ==")
    killed_at, log_text, resumed = killed_and_restarted_run()
    ref = runs[2]["records"]
    resumed_line = next((ln for ln in log_text.splitlines() if ln.startswith("resumed from")), "")
    print(f"  rank 1 SIGKILLed after {killed_at} logged steps; torchrun restarted the group; "
          f"trainer: '{resumed_line}'")
    same = [(a["step"], a["loss"], a.get("val_loss")) == (b["step"], b["loss"], b.get("val_loss"))
            for a, b in zip(ref, resumed)]
    print(f"  {sum(same)}/{len(ref)} steps with exactly the uninterrupted run's loss "
          f"(and val loss); final loss {resumed[-1]['loss']:.6f} vs {ref[-1]['loss']:.6f}")
    assert resumed_line, "the restarted workers must resume from the checkpoint"
    assert len(resumed) == len(ref) == STEPS and all(same), "the resumed run must match exactly"

    results = {"tokens_per_step": {w: runs[w]["tokens_per_step"] for w in runs},
               "tokens_per_s": {w: runs[w]["tokens_per_s"] for w in runs},
               "scaling_efficiency": eff, "load_avg_1min": load, "killed_at_step": killed_at,
               "refusal_line": err_lines[0]}
    (OUT / "results.json").write_text(json.dumps(results, indent=1))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), facecolor=BACKGROUND)
    for ax in (ax1, ax2):
        ax.set_facecolor(PANEL)
    per_proc = [runs[1]["tokens_per_s"], runs[2]["tokens_per_s"] / 2]
    ax1.bar(["1 process", "2 processes"], per_proc, color=[NAVY, GOLD])
    ax1.set_ylabel("tokens/s per process (median)")
    ax1.set_title(f"scaling efficiency T2/(2 T1) = {eff:.2f} (2 cores, load {load:.1f})")
    ax2.plot([r["step"] for r in ref], [r["loss"] for r in ref], color=NAVY, lw=3,
             label="uninterrupted")
    ax2.plot([r["step"] for r in resumed], [r["loss"] for r in resumed], color=GOLD, ls="--",
             label="rank 1 killed, restarted, resumed")
    ax2.axvline(killed_at, color=RED, lw=1, label=f"kill (step {killed_at})")
    ax2.axvline(CKPT_EVERY * (killed_at // CKPT_EVERY), color=MUTED, lw=1,
                label="checkpoint resumed from")
    ax2.set_xlabel("step")
    ax2.set_ylabel("train loss")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(OUT / "ddp_in_practice.png", dpi=120)
    plt.close(fig)
    print(f"\nsaved {OUT / 'ddp_in_practice.png'}; lesson took "
          f"{time.perf_counter() - t_start:.0f} s")
    print("Closing note: the effective batch is micro x accum x world (so 2 ranks double the "
          "tokens per step: halve the micro-batch or the accumulation to keep the recipe); the "
          "sampler shards differ per rank; launch with torchrun, never plain python; checkpoints "
          f"plus --resume make a killed worker cost at most {CKPT_EVERY} steps; measured scaling "
          f"efficiency here {eff:.2f} on 2 shared cores.")


if __name__ == "__main__":
    main()
