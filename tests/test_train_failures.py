"""The trainer under failure: non-finite steps, spikes, the fp16 scale floor, bad files on disk,
mismatched resumes, and the one-line errors of the command line (syllabus 16-06).

Each non-finite case is injected by wrapping `minitrain.train.lm_loss` so that the training
loss of one chosen step is nan (or huge): the trainer must never step on it, never save it, and
say in metrics.jsonl what it did.
"""
import copy
import dataclasses
import math

import pytest
import torch

import minitrain.train as train_module
from minitrain import checkpointing as ckpt
from minitrain.train import ConfigError, TrainingStopped, main, train
from tests.trainer_helpers import read_metrics, tiny_config

pytestmark = [pytest.mark.trainer, pytest.mark.lesson16]


def inject(monkeypatch, at_step, factor=float("nan")):
    """Multiply the training loss of optimizer step `at_step` (accum_steps=1) by `factor`;
    evaluation (no grad) is left alone."""
    real = train_module.lm_loss
    calls = {"n": 0}

    def lm_loss(output, y):
        loss = real(output, y)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] - 1 == at_step:
                return loss * factor
        return loss

    monkeypatch.setattr(train_module, "lm_loss", lm_loss)


def record_states(monkeypatch):
    """{next_step: deep copy of the model/optimizer state returned by every _save}."""
    states, real = {}, train_module._save

    def saving(path, cfg, next_step, *args, **kwargs):
        state = real(path, cfg, next_step, *args, **kwargs)
        states[next_step] = copy.deepcopy(state)
        return state

    monkeypatch.setattr(train_module, "_save", saving)
    return states


def same_tensors(a, b):
    pairs = list(zip(ckpt._walk(a), ckpt._walk(b)))
    return len(pairs) > 0 and all(
        na == nb and (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y)
        for (na, x), (nb, y) in pairs)


def all_finite(path):
    return ckpt.nonfinite_tensors(ckpt.load_checkpoint(path)) == []


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_skip_drops_the_non_finite_step(data_bin, tmp_path, monkeypatch, precision):
    """--on-nonfinite skip, a nan loss at step 3 (every precision): the step changes no weight
    and no optimizer state (the state after step 3 equals the one after step 2), training goes on
    (step 4 changes them again), metrics say event/action/skipped, the checkpoint is finite."""
    inject(monkeypatch, 3)
    states = record_states(monkeypatch)
    result = train(tiny_config(data_bin, tmp_path, steps=5, checkpoint_every=1,
                               on_nonfinite="skip", precision=precision))
    rec = read_metrics(tmp_path)
    assert rec[3]["event"] == "non-finite loss" and rec[3]["action"] == "skip"
    assert rec[3]["skipped"] is True and rec[3]["loss"] is None
    assert [r["event"] for r in rec if r["step"] != 3] == [None] * 4
    assert same_tensors(states[4]["model"], states[3]["model"])
    assert same_tensors(states[4]["optimizer"]["state"], states[3]["optimizer"]["state"])
    assert not same_tensors(states[5]["model"], states[4]["model"])
    assert result.events == [(3, "non-finite loss", "skip")]
    assert all_finite(tmp_path / "checkpoint.pt")


def test_rollback_returns_to_the_last_checkpoint(data_bin, tmp_path, monkeypatch):
    """--on-nonfinite rollback, nan at step 4, checkpoints at 3: after step 4 the model and the
    optimizer state are exactly the step-3 checkpoint's; the lr schedule is unchanged (the same
    lrs as a clean run) and the sampler moves on (the run ends at `steps`)."""
    clean = train(tiny_config(data_bin, tmp_path / "clean", steps=5))
    inject(monkeypatch, 4)
    states = record_states(monkeypatch)
    result = train(tiny_config(data_bin, tmp_path / "run", steps=5, on_nonfinite="rollback"))
    rec = read_metrics(tmp_path / "run")
    assert (rec[4]["event"], rec[4]["action"], rec[4]["rollback_to"]) == \
        ("non-finite loss", "rollback", 3)
    assert same_tensors(states[5]["model"], states[3]["model"])
    assert same_tensors(states[5]["optimizer"]["state"], states[3]["optimizer"]["state"])
    assert result.lrs == clean.lrs and result.losses[:4] == clean.losses[:4]
    assert all_finite(tmp_path / "run" / "checkpoint.pt")


def test_stop_ends_with_one_line_and_resume_continues(data_bin, tmp_path, monkeypatch, capsys):
    """--on-nonfinite stop, nan at step 3: main() exits 1 with ONE stderr line naming the step
    and the checkpoint to resume from; metrics end with the stop record; the step-2 checkpoint
    on disk is finite and --resume from it (with another policy) finishes the run."""
    inject(monkeypatch, 3)
    argv = ["--steps", "5", "--batch-size", "4", "--seq-len", "32", "--n-layer", "1",
            "--n-head", "2", "--n-embd", "32", "--warmup-steps", "1", "--eval-iters", "1",
            "--checkpoint-every", "2", "--log-every", "0", "--data", data_bin,
            "--out-dir", str(tmp_path), "--on-nonfinite", "stop"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step 3" in err and "--resume continues from step 2" in err
    rec = read_metrics(tmp_path)
    assert [r["step"] for r in rec] == [0, 1, 2, 3] and rec[-1]["action"] == "stop"
    assert ckpt.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    assert all_finite(tmp_path / "checkpoint.pt")
    monkeypatch.undo()
    assert main(argv + ["--resume", "--on-nonfinite", "rollback"]) == 0  # the policy may change
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(5))


def test_spike_uses_the_same_policy(data_bin, tmp_path, monkeypatch):
    """--spike-threshold 3: a loss x50 at step 4 (finite) is a spike, and skip drops it."""
    inject(monkeypatch, 4, factor=50.0)
    train(tiny_config(data_bin, tmp_path, steps=6, spike_threshold=3.0, on_nonfinite="skip"))
    rec = read_metrics(tmp_path)
    assert [(r["step"], r["event"], r["action"]) for r in rec if r["event"]] == \
        [(4, "loss spike", "skip")]
    assert rec[4]["loss"] > 3 * max(r["loss"] for r in rec[:4])


def test_fp16_scale_floor_stops_with_one_line(data_bin, tmp_path, monkeypatch):
    """fp16 with --min-loss-scale 65536: a loss x1e30 overflows the scaled gradients at step 2,
    the scaler skips and halves the scale below the floor, the run stops naming the floor."""
    inject(monkeypatch, 2, factor=1e30)
    with pytest.raises(TrainingStopped, match="fp16 scale floor"):
        train(tiny_config(data_bin, tmp_path, steps=6, precision="fp16",
                          min_loss_scale=65536.0))
    rec = read_metrics(tmp_path)
    assert rec[-1]["step"] == 2 and rec[-1]["event"] == "fp16 scale floor"
    assert rec[-1]["skipped"] is True and rec[-1]["action"] == "stop"


def test_z_loss_is_logged_apart_and_equals_its_formula(data_bin, tmp_path):
    """--z-loss w: step 0 logs the same language-model loss as a run without it and a z_loss
    equal to w * mean(logsumexp(logits)^2) of the fresh model on that first batch."""
    import numpy as np

    from minitrain.data import get_batch, load_tokens, split_tokens
    from minitrain.stability import z_loss

    w = 1e-2
    plain = train(tiny_config(data_bin, tmp_path / "plain", steps=1, warmup_steps=0))
    cfg = tiny_config(data_bin, tmp_path / "z", steps=1, warmup_steps=0, z_loss=w)
    train(cfg)
    rec = read_metrics(tmp_path / "z")[0]
    assert rec["loss"] == pytest.approx(plain.losses[0], rel=1e-6)
    train_data, _ = split_tokens(load_tokens(data_bin), cfg.val_fraction)
    x, y = get_batch(train_data, cfg.batch_size, cfg.seq_len, rng=np.random.default_rng(cfg.seed))
    logits = train_module.build_model(cfg)(x)[0]
    expected = w * (torch.logsumexp(logits.double(), -1) ** 2).mean().item()
    assert rec["z_loss"] == pytest.approx(expected, rel=1e-5)
    assert float(z_loss(logits.detach(), weight=w, targets=y)) == pytest.approx(expected, rel=1e-5)


def test_no_checkpoint_with_a_non_finite_weight(data_bin, tmp_path, monkeypatch):
    """An update that leaves a nan weight (injected into optimizer.step at step 5) is never
    saved: the run stops with one reason and checkpoint.pt stays the finite step-3 one.
    save_checkpoint itself refuses a non-finite payload."""
    real_step = train_module.FullPrecision.step
    calls = {"n": 0}

    def poisoning_step(self, optimizer):
        out = real_step(self, optimizer)
        calls["n"] += 1
        if calls["n"] == 6:  # step 5, just before the step-6 checkpoint
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(train_module.FullPrecision, "step", poisoning_step)
    with pytest.raises(TrainingStopped, match="non-finite"):
        train(tiny_config(data_bin, tmp_path, steps=7))
    assert ckpt.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    assert all_finite(tmp_path / "checkpoint.pt")
    with pytest.raises(ckpt.CheckpointError, match="inf/nan"):
        ckpt.save_checkpoint(tmp_path / "bad.pt", {"model": {"w": torch.tensor([math.inf])}})
    assert not (tmp_path / "bad.pt").exists()


# --- nothing on disk is lost ------------------------------------------------------------------

def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_out_dir_of_another_run_is_refused_unless_resume_or_overwrite(data_bin, tmp_path):
    """A second run into the same out_dir is refused (the message names --resume and
    --overwrite) and leaves every byte in place; --overwrite replaces the run."""
    train(tiny_config(data_bin, tmp_path, steps=3))
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        train(tiny_config(data_bin, tmp_path, steps=4))
    assert snapshot(tmp_path) == before
    train(tiny_config(data_bin, tmp_path, steps=4, overwrite=True))
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(4))


def test_a_run_failing_on_its_data_changes_nothing(data_bin, tmp_path):
    """--overwrite with a bad --data (a text file named .bin: ids > 255) fails before touching
    the previous run's files."""
    train(tiny_config(data_bin, tmp_path / "run", steps=3))
    before = snapshot(tmp_path / "run")
    bad = tmp_path / "text.bin"
    bad.write_text("plain text, not tokens" * 20)
    with pytest.raises(ConfigError, match="ids up to"):
        train(tiny_config(str(bad), tmp_path / "run", steps=3, overwrite=True))
    assert snapshot(tmp_path / "run") == before


def _resave(path, **changes):
    state = ckpt.load_checkpoint(path)
    state.update(changes)
    ckpt.save_checkpoint(path, {k: v for k, v in state.items() if k != "checksum"})


def test_resume_refuses_what_would_change_the_numbers(data_bin, tmp_path):
    """--resume refuses, one ConfigError each: a checkpoint of another world size, other token
    data under the same path, flipped bytes (checksum), a zero-byte or foreign file, a
    metrics.jsonl that lost a line. A good checkpoint still resumes."""
    data = tmp_path / "data.bin"
    data.write_bytes(open(data_bin, "rb").read())
    out = tmp_path / "run"
    cfg = tiny_config(str(data), out, steps=3)
    train(cfg)
    resume = dataclasses.replace(cfg, steps=3, resume=True)
    good = (out / "checkpoint.pt").read_bytes()
    metrics = (out / "metrics.jsonl").read_bytes()

    _resave(out / "checkpoint.pt", world_size=2)
    with pytest.raises(ConfigError, match="2 process"):
        train(resume)
    (out / "checkpoint.pt").write_bytes(good)

    original = data.read_bytes()
    data.write_bytes(original[:-2000] + bytes(2000))
    with pytest.raises(ConfigError, match="token data differ"):
        train(resume)
    data.write_bytes(original)

    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x01  # a bit in the middle: inside some tensor's bytes
    (out / "checkpoint.pt").write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match="checksum|not a readable"):
        train(resume)
    for content, why in ((b"", "not a readable"), (None, "not a minitrain")):
        if content is None:
            torch.save(train_module.build_model(cfg).state_dict(), out / "checkpoint.pt")
        else:
            (out / "checkpoint.pt").write_bytes(content)
        with pytest.raises(ConfigError, match=why):
            train(resume)
    (out / "checkpoint.pt").write_bytes(good)

    lines = metrics.decode().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text(lines[0] + lines[2])
    with pytest.raises(ConfigError, match="one line for each"):
        train(resume)
    (out / "metrics.jsonl").write_bytes(metrics)
    assert train(resume).steps_run == 0


# --- every error path is one line ---------------------------------------------------------------

def _argv(data_bin, out_dir, *extra):
    return ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--n-layer", "1", "--n-head",
            "2", "--n-embd", "16", "--warmup-steps", "1", "--eval-iters", "1", "--log-every", "0",
            "--data", data_bin, "--out-dir", str(out_dir), *extra]


def test_interrupt_and_full_disk_are_one_line(data_bin, tmp_path, monkeypatch, capsys):
    """Ctrl-C at step 3 prints 'interrupted at step 3; --resume continues from step 3'
    (checkpoints every step) and exits 130; a full disk (ENOSPC while logging) is one line
    naming the file and exits 1."""
    real = train_module._draw_micro_batches
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "_draw_micro_batches", interrupted)
    assert main(_argv(data_bin, tmp_path / "a", "--checkpoint-every", "1")) == 130
    err = capsys.readouterr().err
    assert err == ("python -m minitrain.train: interrupted at step 3; --resume continues from "
                   "step 3\n")
    monkeypatch.undo()

    def full_disk(path_or_file, record, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "b" / "metrics.jsonl"))

    monkeypatch.setattr(train_module, "append_jsonl", full_disk)
    assert main(_argv(data_bin, tmp_path / "b")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "metrics.jsonl" in err


@pytest.mark.parametrize("case", ["out_dir_is_file", "read_only_out_dir", "cache_dir_is_file",
                                  "absurd_batch", "corpus_bytes_with_data", "odd_bin",
                                  "resume_with_overwrite", "bad_policy"])
def test_bad_inputs_are_one_line_and_change_nothing(data_bin, tmp_path, capsys, monkeypatch,
                                                    case):
    """Each bad input exits non-zero with one stderr line naming the flag, and the files of the
    run already in out_dir are byte-for-byte unchanged."""
    run = tmp_path / "run"
    assert main(_argv(data_bin, run)) == 0
    capsys.readouterr()
    before = snapshot(run)
    (tmp_path / "file").write_text("x")
    text = tmp_path / "t.txt"
    text.write_text("some text " * 100)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    argv, flag = {
        "out_dir_is_file": (_argv(data_bin, tmp_path / "file"), "--out-dir"),
        "read_only_out_dir": (_argv(data_bin, run / "sub", "--overwrite"), "--out-dir"),
        "cache_dir_is_file": (_argv(str(text), tmp_path / "new") + ["--cache-dir",
                                                                     str(tmp_path / "file")],
                              "--cache-dir"),
        "absurd_batch": (_argv(data_bin, run, "--resume", "--batch-size", str(10**9)),
                         "--batch-size"),
        "corpus_bytes_with_data": (_argv(data_bin, run, "--corpus-bytes", "1000"),
                                   "--corpus-bytes"),
        "odd_bin": (_argv(str(odd), run, "--overwrite"), "--data"),
        "resume_with_overwrite": (_argv(data_bin, run, "--resume", "--overwrite"), "--overwrite"),
        "bad_policy": (_argv(data_bin, run, "--resume", "--on-nonfinite", "pray"),
                       "--on-nonfinite"),
    }[case]
    if case == "read_only_out_dir":  # root may write anyway: ask os.access as a user would
        monkeypatch.setattr(ckpt.os, "access", lambda path, mode: False)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own choice errors
        code = exc.code
    err = capsys.readouterr().err
    assert code not in (0, None)
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err, err
    assert snapshot(run) == before
