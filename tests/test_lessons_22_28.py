"""The checking helpers of lessons 22 (DDP in practice) and 28 (capstone pipeline) check what
they say: the effective-batch check reads the trainer's real log line and cannot confuse one
world size with another; a capstone row is valid exactly when its step-0 loss is within the
precision-aware tolerance of row 0's."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minitrain.train import format_log_line
from tests.lesson_modules import load_lesson

L22 = load_lesson("22_ddp_in_practice.py")
L28 = load_lesson("28_capstone_pipeline.py")


@pytest.mark.lesson22
@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(64, 1_000_000), ms=st.floats(5.0, 5_000.0), step=st.integers(0, 10**5))
def test_logged_tokens_interval_holds_the_true_tokens_and_not_twice_them(tokens, ms, step):
    """For a step of `tokens` tokens that took `ms` ms, the trainer's own log line (its
    format_log_line rounds both the ms and the tok/s) parsed by lesson 22 gives an interval that
    contains `tokens` and does NOT contain 2 x tokens (the world-size mistake it must catch).
    Steps of >= 5 ms and >= 64 tokens (>= 12.8 tok/s): the printed rounding is then < 15%."""
    dt = ms / 1000
    record = {"step": step, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.9,
              "tokens_per_s": tokens / dt, "skipped": False}
    bounds = L22.logged_tokens_per_step("noise line\n" + format_log_line(record, dt) + "\n")
    assert len(bounds) == 1, "exactly the one step line must be parsed"
    lo, hi = bounds[0]
    assert lo <= tokens <= hi
    assert not lo <= 2 * tokens <= hi and not lo <= tokens / 2 <= hi


def _row(precision, loss_step0):
    return {"config": {"precision": precision}, "loss_step0": loss_step0, "final_loss": 3.0,
            "tokens_per_s": 1000.0, "final_val_loss": 3.1}


@pytest.mark.lesson28
@settings(max_examples=80, deadline=None)
@given(ref=st.floats(1.0, 10.0), rel=st.floats(0.0, 0.05),
       precision=st.sampled_from(["fp32", "bf16", "fp16"]), sign=st.sampled_from([-1, 1]))
def test_capstone_row_is_valid_iff_its_step0_loss_is_within_the_precision_tolerance(
        ref, rel, precision, sign):
    """A row whose step-0 loss differs from row 0's by the relative amount `rel` is valid
    exactly when rel <= the ladder's tolerance for its precision (fp32: rung 0's 1e-4; bf16 and
    fp16: rung 5's 2e-2), whichever side of row 0 it falls on."""
    tol = L28.FP32_TOL if precision == "fp32" else L28.BF16_TOL
    loss = ref * (1 + sign * rel)
    err = abs(loss - ref) / ref  # what the row really differs by, after float rounding
    if math.isclose(err, tol, rel_tol=1e-9):
        return  # on the boundary itself float rounding decides; not a property of the code
    ok, reason = L28.validate_row(_row(precision, loss), ref)
    assert ok == (err <= tol), reason


@pytest.mark.lesson28
def test_capstone_row_with_a_non_finite_number_is_invalid():
    """A nan step-0 loss, or an inf speed, never passes validation (its speed is not shown)."""
    assert not L28.validate_row(_row("fp32", float("nan")), 5.0)[0]
    bad = _row("bf16", 5.0)
    bad["tokens_per_s"] = float("inf")
    assert not L28.validate_row(bad, 5.0)[0]
    assert L28.validate_row(_row("fp32", 5.0), 5.0)[0]  # the same row, finite, passes
