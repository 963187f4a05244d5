"""The deck's look and the conventions every animation script shares.

An animation script computes its whole trajectory with minitrain first, then renders it:

    args = deck.parse_args(__doc__)                 # --quick, --out FILE, --stills
    fig = deck.figure()                             # 16:9, deck palette
    ...                                             # build artists once
    def update(frame): ...                          # only mutates artists
    deck.save(fig, update, n_frames, args, default_name="scheduler_stability")

`--quick` asks for a few small frames (the test suite renders every animation this way);
`--stills` also exports key frames as PNG for handouts. GIF always (Pillow); MP4 as well when
ffmpeg is on the PATH.
"""
import argparse
import pathlib
import shutil
import tempfile

import matplotlib.pyplot as plt  # the Makefile and the tests set MPLBACKEND=Agg: files only
from matplotlib.animation import FFMpegWriter, FuncAnimation, PillowWriter

from minitrain.files import write_atomic
# The deck's palette lives in minitrain.style (one source for lessons, animations, the demo);
# re-exported here so animations write deck.NAVY, deck.GOLD, ...
from minitrain.style import BACKGROUND, GOLD, GREEN, MUTED, NAVY, PANEL, RED, TEXT, outputs_dir

__all__ = ["BACKGROUND", "PANEL", "TEXT", "NAVY", "GOLD", "MUTED", "RED", "GREEN", "FIGSIZE",
           "DPI", "QUICK_DPI", "FPS", "OUT_DIR", "parse_args", "style_axes", "figure",
           "output_path", "save"]

FIGSIZE = (16, 9)  # inches: 16:9
DPI = 120  # 16 x 120 = 1920 px wide, 9 x 120 = 1080 px high
QUICK_DPI = 30  # --quick: 480 x 270, fast to render
FPS = 12
OUT_DIR = outputs_dir("animations")  # <repo>/outputs/animations, wherever the script starts


def parse_args(description=None, argv=None):
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few small frames from a small run (used by the tests)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="output file (.gif); default outputs/animations/<name>.gif")
    parser.add_argument("--stills", action="store_true",
                        help="also export key frames as PNG beside the GIF")
    return parser.parse_args(argv)


def style_axes(ax, title=None):
    """Panel background, quiet spines, deck text colour."""
    ax.set_facecolor(PANEL)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color(MUTED)
    ax.tick_params(colors=TEXT, labelsize=11)
    ax.xaxis.label.set_color(TEXT)
    ax.yaxis.label.set_color(TEXT)
    if title:
        ax.set_title(title, color=NAVY, fontsize=15, loc="left", fontweight="bold")
    return ax


def figure(nrows=1, ncols=1, title=None, wisdom=None, **subplot_kw):
    """A 16:9 figure in the deck's palette; returns (fig, axes)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=FIGSIZE, facecolor=BACKGROUND, **subplot_kw)
    for ax in (axes.flat if hasattr(axes, "flat") else [axes]):
        style_axes(ax)
    if title:
        fig.suptitle(title, color=NAVY, fontsize=22, fontweight="bold", x=0.03, ha="left")
    if wisdom:
        fig.text(0.5, 0.015, wisdom, ha="center", va="bottom", color=GOLD, fontsize=15,
                 style="italic")
    return fig, axes


def output_path(args, default_name):
    if args.out is not None:
        return pathlib.Path(args.out)
    suffix = "_quick" if args.quick else ""
    return OUT_DIR / f"{default_name}{suffix}.gif"


def save(fig, update, n_frames, args, *, default_name, still_frames=(), fps=FPS):
    """Render `update(frame)` for every frame to a GIF (and MP4 if ffmpeg exists).

    `still_frames`: frame indices exported as PNG when --stills is given. Returns the GIF path.
    """
    path = output_path(args, default_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    dpi = QUICK_DPI if args.quick else DPI
    anim = FuncAnimation(fig, update, frames=n_frames, blit=False)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # render aside, then one atomic
        rendered = pathlib.Path(tmp) / path.name              # write: never half a GIF at `path`
        anim.save(rendered, writer=PillowWriter(fps=fps), dpi=dpi,
                  savefig_kwargs={"facecolor": BACKGROUND})
        write_atomic(path, rendered.read_bytes())
    if not args.quick and shutil.which("ffmpeg"):
        anim.save(path.with_suffix(".mp4"), writer=FFMpegWriter(fps=fps), dpi=dpi,
                  savefig_kwargs={"facecolor": BACKGROUND})
    if args.stills:
        for i in still_frames or (n_frames - 1,):
            update(i)
            fig.savefig(path.with_name(f"{path.stem}_frame{i:03d}.png"), dpi=dpi,
                        facecolor=BACKGROUND)
    plt.close(fig)
    print(f"wrote {path} ({n_frames} frames)")
    return path
