"""Every animation renders with --quick: a real GIF with several frames, from a real run."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "animations").glob("[a-z]*.py") if p.name != "deck.py")


@pytest.mark.animation
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_animation_renders_quick_gif_with_several_frames(script, tmp_path):
    """`python animations/X.py --quick --out F.gif`, started from another folder with no
    PYTHONPATH (the editable install is all a script needs), exits 0 and writes a multi-frame
    GIF."""
    from PIL import Image

    out = tmp_path / f"{script.stem}.gif"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240,
                          env={**env, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists()
    with Image.open(out) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames >= 2
