"""The deck's palette and where scripts write their outputs: one place for both.

Lessons, animations, benchmarks and the demo all draw in the course deck's colours and all write
under `outputs/` at the repository root, wherever they are started from (`python lessons/03_...`
from the root, or `cd lessons && python 03_...`). This module is the single source of both, so a
colour or a path is never copied into a script.
"""
import pathlib

# The deck's palette (Module 8 deck: background, panels, text, navy, gold).
BACKGROUND = "#FAFAFA"
PANEL = "#F0F4F8"
TEXT = "#2D3748"
NAVY = "#1A365D"
GOLD = "#C9A227"
MUTED = "#A0AEC0"  # light slate for secondary lines and grids
RED = "#C53030"  # reserved for "something went wrong" (overflow, spikes, divergence)
GREEN = "#2F855A"  # reserved for "recovered" / "passes"


def repo_root():
    """The checkout's root (the folder holding pyproject.toml above this package); with a
    non-editable install, the current directory."""
    here = pathlib.Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").is_file() else pathlib.Path.cwd()


def outputs_dir(*parts):
    """`<repo root>/outputs/<parts...>`, created if missing: e.g. outputs_dir("lesson03")."""
    path = repo_root().joinpath("outputs", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
