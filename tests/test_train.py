"""The trainer (minitrain.train): metrics, checkpoints, precisions, CLI, exact kill-and-resume."""
import dataclasses
import multiprocessing
import os
import signal
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minitrain.checkpointing import load_checkpoint
from minitrain.train import (ConfigError, RunResult, TrainConfig, build_parser, lm_loss, main,
                             train)
from tests.strategies import seeds
from tests.trainer_helpers import read_metrics, tiny_config

pytestmark = pytest.mark.trainer
API_FIELDS = dict(
    steps=200, batch_size=16, seq_len=128, accum_steps=1, max_lr=1e-3, min_lr=1e-4,
    warmup_steps=20, clip_norm=1.0, weight_decay=0.1, n_layer=4, n_head=4, n_embd=128,
    attention="sdpa", native_layers=True, precision="fp32", compile=False, fused_adamw=False,
    loader="ram", batching="vectorized", zero_stage=0, activation_checkpointing=False, data=None,
    eval_every=50, eval_iters=10, checkpoint_every=50, seed=0, out_dir="outputs/run", resume=False)
METRIC_FIELDS = {"step", "loss", "lr", "grad_norm", "clipped", "skipped", "scale", "tokens_per_s",
                 "peak_mem_bytes"}




def test_config_has_the_documented_fields_and_defaults():
    """TrainConfig has every field API.md lists, with its documented default."""
    cfg = TrainConfig()
    for name, default in API_FIELDS.items():
        assert getattr(cfg, name) == default, name


def test_metrics_checkpoint_and_result(data_bin, tmp_path):
    """One metrics line per step with every documented field (val_loss on eval steps and the last);
    the checkpoint loads with weights_only=True and holds only plain types; RunResult agrees."""
    result = train(tiny_config(data_bin, tmp_path))
    assert isinstance(result, RunResult)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(7))
    for r in records:
        assert METRIC_FIELDS <= set(r)
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0
        assert r["clipped"] == (r["grad_norm"] > 1.0) and r["skipped"] is False
    assert [r["step"] for r in records if "val_loss" in r] == [2, 5, 6]
    assert result.final_loss == records[-1]["loss"]
    assert result.final_val_loss == records[-1]["val_loss"]
    assert result.losses == [r["loss"] for r in records] and result.steps_run == 7
    assert records[0]["loss"] == pytest.approx(5.545, abs=0.15)  # fresh model: about ln 256

    state = load_checkpoint(result.checkpoint_path)
    assert state["step"] == 7
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "config"):
        assert key in state
    assert {"torch", "numpy", "python", "sampler"} <= set(state["rng"])

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (torch.Tensor, str, int, float, bool))
    assert plain(state)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("overrides", [dict(precision="fp16", accum_steps=2),
                                       dict(precision="bf16"),
                                       dict(accum_steps=3, loader="memmap", batching="loop")])
def test_precision_and_accumulation_smoke(data_bin, tmp_path, overrides):
    """fp16 (+GradScaler), bf16 and accumulation train: finite losses that go down, a line per
    step, fp16 logs the scaler's scale (65536 at the start) and its checkpoint (weights_only)
    holds the scaler's state."""
    result = train(tiny_config(data_bin, tmp_path, steps=6, max_lr=3e-3, **overrides))
    records = read_metrics(tmp_path)
    assert len(records) == 6 and all(r["loss"] is not None for r in records)
    assert result.final_loss < records[0]["loss"]
    state = load_checkpoint(result.checkpoint_path)  # weights_only=True, also with a scaler
    if overrides.get("precision") == "fp16":
        assert records[0]["scale"] == 65536.0
        backoff = 2 if records[-1]["skipped"] else 1  # the scale after the last update
        assert state["scaler"]["scale"] == records[-1]["scale"] / backoff
    else:
        assert state["scaler"] is None
        assert all(r["scale"] == 1.0 for r in records)


def test_loop_and_vectorized_batching_train_identically(data_bin, tmp_path):
    """batching='loop' and 'vectorized' (and memmap vs RAM) give bit-identical losses."""
    a = train(tiny_config(data_bin, tmp_path / "a", steps=3))
    b = train(tiny_config(data_bin, tmp_path / "b", steps=3, batching="loop", loader="memmap"))
    assert a.losses == b.losses


def test_resume_continues_exactly_in_process(data_bin, tmp_path, monkeypatch):
    """Die just before the final checkpoint (checkpoint at step 6, lines for steps 0..8 and a
    torn half line after it), resume: steps 6..8 are re-run, metrics.jsonl keeps exactly one line
    per step, and the losses equal an uninterrupted run's. A finished run resumes to a no-op."""
    import minitrain.train as train_module

    ref = train(tiny_config(data_bin, tmp_path / "ref", steps=9))
    out = tmp_path / "part"
    real_save = train_module._save

    class Killed(Exception):
        pass

    def dying_save(path, cfg, next_step, *args, **kwargs):
        if next_step == 9:
            with open(out / "metrics.jsonl", "a") as f:
                f.write('{"step": 9, "lo')  # a line torn by the kill
            raise Killed
        return real_save(path, cfg, next_step, *args, **kwargs)

    monkeypatch.setattr(train_module, "_save", dying_save)
    with pytest.raises(Killed):
        train(tiny_config(data_bin, out, steps=9))
    monkeypatch.setattr(train_module, "_save", real_save)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 6
    resumed = train(tiny_config(data_bin, out, steps=9, resume=True))
    assert resumed.start_step == 6 and resumed.steps_run == 3
    assert [r["step"] for r in read_metrics(out)] == list(range(9))
    assert resumed.losses == ref.losses and resumed.final_val_loss == ref.final_val_loss
    again = train(tiny_config(data_bin, out, steps=9, resume=True))
    assert again.steps_run == 0 and again.losses == ref.losses
    assert again.final_val_loss == ref.final_val_loss


def test_resume_with_a_different_config_is_refused(data_bin, tmp_path):
    """--resume with a setting that changes the numbers raises ConfigError naming that field."""
    train(tiny_config(data_bin, tmp_path, steps=3))
    with pytest.raises(ConfigError, match="max_lr"):
        train(tiny_config(data_bin, tmp_path, steps=3, max_lr=5e-3, resume=True))


def test_kill_and_resume_is_bit_exact(data_bin, tmp_path):
    """A run SIGKILLed mid-run (after >= 20 metrics lines) and restarted with resume=True logs
    exactly the uninterrupted run's losses, val losses, lrs and grad norms, one line per step.
    The victim is a forked process (no second torch import); SIGKILL gives it no chance to
    clean up, as a crash or an out-of-memory kill would not."""
    steps = 100
    kw = dict(steps=steps, checkpoint_every=7, eval_every=20, eval_iters=1)
    ref = train(tiny_config(data_bin, tmp_path / "ref", **kw))
    out = tmp_path / "killed"
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=train, args=(tiny_config(data_bin, out, **kw),))
    proc.start()
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.is_alive():
            if metrics.exists() and metrics.read_text().count("\n") >= 20:
                break
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL, "the run ended before it could be killed"
    logged = metrics.read_text().count("\n")
    assert 20 <= logged < steps
    resumed = train(tiny_config(data_bin, out, resume=True, **kw))
    assert 0 < resumed.start_step <= logged
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(steps))
    ref_records = read_metrics(tmp_path / "ref")
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        assert [r.get(key) for r in records] == [r.get(key) for r in ref_records], key
    assert resumed.losses == ref.losses and resumed.final_val_loss == ref.final_val_loss


def test_every_field_is_a_flag():
    """The CLI has one flag per TrainConfig field, booleans as --x/--no-x, and parses back to
    the defaults; --clip-norm none is None."""
    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    assert defaults == dataclasses.asdict(TrainConfig())
    args = parser.parse_args(["--max-lr", "3e-4", "--no-native-layers", "--compile",
                              "--clip-norm", "none", "--zero-stage", "0"])
    assert args.max_lr == 3e-4 and args.native_layers is False and args.compile is True
    assert args.clip_norm is None


BAD = [(["--max-lr", "-1"], "--max-lr"), (["--steps", "0"], "--steps"),
       (["--steps", "abc"], "--steps"), (["--precision", "fp8"], "--precision"),
       (["--clip-norm", "0"], "--clip-norm"), (["--n-head", "3"], "--n-head"),
       (["--min-lr", "1"], "--min-lr"), (["--warmup-steps", "300"], "--warmup-steps"),
       (["--loader", "disk"], "--loader"), (["--zero-stage", "1"], "--zero-stage"),
       (["--zero-stage", "4"], "--zero-stage"), (["--data", "/no/such/file"], "--data"),
       (["--batch-size", "-2"], "--batch-size"), (["--eval-every", "0"], "--eval-every")]


@pytest.mark.parametrize("argv,flag", BAD)
def test_cli_bad_values_one_line(argv, flag, capsys, tmp_path):
    """A bad value exits non-zero before training with one stderr line that names the flag.
    (In-process: an exception main() failed to catch would surface here as a test error, so
    this also proves there is no traceback; test_train_distributed.py runs the real command.)"""
    try:
        code = main(argv + ["--out-dir", str(tmp_path)])
    except SystemExit as exc:  # argparse's own type/choice errors
        code = exc.code
    err = capsys.readouterr().err
    assert code not in (0, None)
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_train_raises_value_error_naming_field(data_bin, tmp_path):
    """train() itself raises a ValueError naming the bad field (no CLI involved)."""
    for field, value in [("accum_steps", 0), ("precision", "fp64"), ("seq_len", 10**7)]:
        cfg = dataclasses.replace(tiny_config(data_bin, tmp_path), **{field: value})
        with pytest.raises(ValueError, match=field):
            train(cfg)


@pytest.mark.lesson01
@given(seed=seeds, batch_size=st.integers(1, 5), seq_len=st.integers(1, 8))
def test_batch_gradient_is_mean_of_per_sample_gradients(seed, batch_size, seq_len):
    """Lesson 01's claim: the batch loss is the mean of the per-sample losses and the batch
    gradient the mean of the per-sample gradients (float64, tiny GPT, random tokens)."""
    from minitrain.model import GPT, GPTConfig

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16)).double()
    x = torch.randint(0, 256, (batch_size, seq_len), generator=gen)
    y = torch.randint(0, 256, (batch_size, seq_len), generator=gen)

    def loss_and_grad(xb, yb):
        model.zero_grad(set_to_none=True)
        loss = lm_loss(model(xb), yb)
        loss.backward()
        return loss.item(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    batch_loss, batch_grad = loss_and_grad(x, y)
    per_sample = [loss_and_grad(x[i:i + 1], y[i:i + 1]) for i in range(batch_size)]
    assert batch_loss == pytest.approx(sum(l for l, _ in per_sample) / batch_size, abs=1e-12)
    mean_grad = torch.stack([g for _, g in per_sample]).mean(dim=0)
    assert torch.allclose(batch_grad, mean_grad, rtol=0, atol=1e-12)
