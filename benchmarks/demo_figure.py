"""The demo's figure: train loss, validation loss and the lr schedule of a run, from its metrics.

What: reads `metrics.jsonl` (one line per optimizer step: step, loss, lr, val_loss on evaluation
steps) with `minitrain.files.read_jsonl` and draws loss and lr against the step in the deck's
palette (`minitrain.style`). `make demo` runs `python -m minitrain.demo` (train, sample, print)
and then this script, so the library itself never plots.

Why from the log and not from the Python result: the figure then shows exactly what the run
recorded, and it can be redrawn for any run (`--metrics outputs/run/metrics.jsonl`) without
training again.

    python -m benchmarks.demo_figure [--metrics outputs/demo/run/metrics.jsonl] [--out FILE]
"""
import argparse
import math
import pathlib

import matplotlib.pyplot as plt  # `make demo` sets MPLBACKEND=Agg: files only, no window

from minitrain.files import read_jsonl
from minitrain.style import BACKGROUND, GOLD, MUTED, NAVY, PANEL, TEXT, outputs_dir


def plot_run(records, path, *, title):
    """Train loss, val loss and lr against the step; writes `path` and returns it."""
    if not records:
        raise ValueError("records is empty: pass the metrics.jsonl of a run that trained")
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, facecolor=BACKGROUND,
                                         gridspec_kw={"height_ratios": [3, 1]})
    ax_loss.plot(steps, [r["loss"] for r in records], color=NAVY, lw=1,
                 label="train loss (one batch)")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        vs, vl = zip(*val)
        ax_loss.plot(vs, vl, "o-", color=GOLD, lw=2, label="validation loss")
    ax_loss.axhline(math.log(256), color=MUTED, ls="--", lw=1, label="ln 256 (uniform guess)")
    ax_loss.set_ylim(top=math.log(256) + 0.25)  # keep the uniform-guess line in view
    ax_loss.set_ylabel("loss (nats / byte)", color=TEXT)
    ax_loss.legend(frameon=False)
    ax_lr.plot(steps, [r["lr"] for r in records], color=NAVY)
    ax_lr.set_ylabel("lr", color=TEXT)
    ax_lr.set_xlabel("optimizer step", color=TEXT)
    for ax in (ax_loss, ax_lr):
        ax.set_facecolor(PANEL)
        ax.grid(color="white")
    ax_loss.set_title(title, color=NAVY, loc="left")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, facecolor=BACKGROUND)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=pathlib.Path, default=None,
                        help="a run's metrics.jsonl (default: the demo's, outputs/demo/run/)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="the PNG to write (default: outputs/demo/loss_lr.png)")
    args = parser.parse_args(argv)
    metrics = args.metrics or outputs_dir("demo", "run") / "metrics.jsonl"
    records = read_jsonl(metrics)
    if not records:
        parser.error(f"--metrics: {metrics} holds no metrics lines; run `make demo` first")
    out = args.out or outputs_dir("demo") / "loss_lr.png"
    plot_run(records, out, title="Tiny GPT on the Python standard library: warmup + cosine, "
                                 "clip 1.0")
    print(f"figure: {out}")
    return out


if __name__ == "__main__":
    main()
