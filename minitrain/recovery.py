"""Recovery: how the trainer judges a step and what it says when a run has to stop.

What the trainer does when a run goes wrong (syllabus 16-06; `minitrain.stability` has
the taxonomy):
- A non-finite loss or grad norm (fp16: a non-finite loss; an inf/nan fp16 gradient is the
  GradScaler's normal business: skip and halve the scale) or, with `--spike-threshold K`, a loss
  above K x the median of the last 50 is caught BEFORE `optimizer.step()`. All ranks see the
  same all-reduced loss and norm, so all take the same decision. `--on-nonfinite` says what:
  `rollback` (default) restores model, optimizer and scaler from the last checkpoint (kept in
  memory too) and goes on with the NEXT batches and the same lr schedule, so the batches that
  led there are not replayed and the run still ends at `steps`; `skip` drops this one update;
  `stop` ends the run with one line naming the step. Why rollback by default: a non-finite or
  spiking loss often means the weights or Adam's moments are already heading out (lr too high,
  an overflow), which skipping one batch does not undo; going back to known-good weights and
  past the data is what large runs do (PaLM, OPT), and it costs at most `checkpoint_every`
  steps. Each event is a metrics.jsonl field (`event`, `action`, `rollback_to`) and a log line.
- fp16: a scale below `--min-loss-scale` (default 1) ends the run: the gradients overflow even
  unscaled, and halving further only hides it. `--z-loss W` adds PaLM's W * logsumexp^2 term
  (logged apart as `z_loss`; `loss` stays the language-model loss).
- A checkpoint is never written with an inf/nan tensor (checked on every rank first).
- Nothing on disk is lost: an out_dir holding another run is refused unless `--resume` or
  `--overwrite`, and nothing in it changes before the settings, the data and the checkpoint
  (world size, data fingerprint, checksum) have been checked.
- Every error is one line (`main`): bad flags exit 2; a run that had to stop (policy, scale
  floor, out of memory, full disk, a stuck or dead rank) exits 1; Ctrl-C exits 130 with
  "interrupted at step N; --resume continues from step M".
- Under torchrun the process group and every collective wait at most `--dist-timeout-s`
  (default 300 s): a rank that stops answering ends the others with one line after that long
  (then torchrun itself takes up to 30 s more to kill what is left).

Formula: a step is bad if its all-reduced loss is not finite, or (not fp16) its grad norm is not
finite, or (with --spike-threshold K) its loss > K x the median of the last 50 losses.

When it helps: long runs, where one bad batch or an overflow must not end (or poison) the run.

Common bug: each rank deciding on its own loss (one rank rolls back, the other steps: the
replicas drift apart, or a collective hangs). The loss and norm judged here are all-reduced.
"""
import math

__all__ = ["judge", "event_line", "stop_message", "resume_hint", "num"]


def judge(loss, norm, precision, spikes):
    """None for a healthy step, else what is wrong with it (the same on every rank: loss and
    norm are all-reduced). fp16: an inf/nan gradient is the GradScaler's business (it skips and
    backs off), so only a non-finite LOSS is an event there."""
    if not math.isfinite(loss):
        return "non-finite loss"
    if not math.isfinite(norm) and precision.scaler is None:
        return "non-finite grad norm"
    if spikes is not None and spikes.update(loss):
        return "loss spike"
    return None


def resume_hint(saved):
    if saved is None:
        return "no checkpoint yet: --resume starts again from step 0"
    return f"--resume continues from step {saved}"


def event_line(record, cfg):
    """One line per event: what happened at which step, and what the trainer did about it."""
    what = {"skip": "step skipped", "rollback": f"rolled back to step {record.get('rollback_to')}",
            "stop": "stopping"}[record["action"]]
    detail = (f"scale {record.get('scale_after', 0.0):g} < --min-loss-scale "
              f"{cfg.min_loss_scale:g}"
              if record["event"] == "fp16 scale floor" else
              f"loss {num(record['loss'], '.4f')}, norm {num(record['grad_norm'], '.2f')}")
    return f"step {record['step']} | {record['event']} ({detail}) | {what}"


def stop_message(record, cfg, saved):
    if record["event"] == "fp16 scale floor":
        hint = "the fp16 gradients overflow even unscaled: lower --max-lr, clip, or use bf16"
    else:
        hint = ("rerun with a lower --max-lr, --clip-norm or --z-loss 1e-4, or resume with "
                "--on-nonfinite rollback")
    return (f"stopped at step {record['step']}: {record['event']} (--on-nonfinite "
            f"{cfg.on_nonfinite}); {hint}; {resume_hint(saved)}")


def num(v, fmt):
    return "inf/nan" if v is None else format(v, fmt)  # None = non-finite in the record
