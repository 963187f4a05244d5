"""FlashAttention's tile sweep beside the full score matrix of naive attention.

Left: naive attention computes every score of the (T, T) matrix S = Q K^T / sqrt(d) and holds
it (and the probabilities) at once - T^2 numbers. Middle: flash attention visits one
(block x block) tile at a time, query tiles top to bottom, key tiles left to right, skipping the
tiles above the causal diagonal; it never holds more than one tile. Right: for the query rows of
the current tile, the running max m and the running sum l = sum exp(s - m) after each tile -
real values reported by minitrain.attention.flash_attention_traced (the same tile loop as
flash_attention), whose output is asserted equal to flash_attention's and to PyTorch's SDPA.
When a new tile raises m, the old sum is rescaled by exp(m_old - m_new): watch l drop and grow.

    python animations/flash_tiling.py            # 1920x1080 GIF in outputs/animations/
    python animations/flash_tiling.py --quick    # a few small frames (tests)
    python animations/flash_tiling.py --stills   # also key frames as PNG
"""
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.patches import Rectangle

from minitrain.attention import flash_attention, flash_attention_traced
import deck  # animations/deck.py: this script's folder is on sys.path

SEED = 0
HEAD_DIM = 16
FULL = dict(T=48, block=8, intro_frames=12, frames_per_tile=2, hold_frames=12)
QUICK = dict(T=16, block=8, intro_frames=1, frames_per_tile=1, hold_frames=0)
WISDOM = "Never hold the T x T matrix: keep a running max and a running sum, rescale when the max grows."


def compute(T, block):
    """Run the instrumented flash forward on one head; return scores and the per-tile trace."""
    gen = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(1, T, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(3))
    steps = []

    def trace(q_start, q_end, k_start, k_end, m, l):
        steps.append(dict(q=(q_start, q_end), k=(k_start, k_end), m=m[0].numpy(), l=l[0].numpy()))

    out = flash_attention_traced(q, k, v, trace, causal=True, block_size=block)
    torch.testing.assert_close(out, flash_attention(q, k, v, causal=True, block_size=block))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    scores = (q[0] @ k[0].T / HEAD_DIM**0.5).numpy()  # (T, T): for display (naive panel)
    scores[np.triu_indices(T, 1)] = np.nan  # causal: j > i masked
    return scores, steps


def main():
    args = deck.parse_args(__doc__)
    cfg = QUICK if args.quick else FULL
    T, block = cfg["T"], cfg["block"]
    scores, steps = compute(T, block)
    n_intro, n_tiles, per_tile = cfg["intro_frames"], len(steps), cfg["frames_per_tile"]
    n_frames = n_intro + n_tiles * per_tile + cfg["hold_frames"]
    m_all = np.concatenate([s["m"] for s in steps])
    l_all = np.concatenate([s["l"] for s in steps])
    m_lim = (min(0.0, m_all.min()) - 0.3, m_all.max() + 0.3)
    l_lim = (0.0, l_all.max() * 1.1)

    fig, axes = deck.figure(2, 3, title="Flash attention: tiles, a running max and a running sum",
                            wisdom=WISDOM, gridspec_kw=dict(width_ratios=[1, 1, 0.9]))
    grid = axes[0, 0].get_gridspec()
    for ax in (*axes[:, 0], *axes[:, 1]):
        ax.remove()
    ax_naive = deck.style_axes(fig.add_subplot(grid[:, 0]), "naive: the whole (T, T) matrix")
    ax_flash = deck.style_axes(fig.add_subplot(grid[:, 1]), "flash: one tile at a time")
    ax_m, ax_l = axes[0, 2], axes[1, 2]
    fig.subplots_adjust(left=0.04, right=0.98, top=0.86, bottom=0.1, wspace=0.25, hspace=0.45)

    cmap = LinearSegmentedColormap.from_list("deck", [deck.PANEL, deck.NAVY])
    cmap.set_bad(deck.BACKGROUND)
    vmin, vmax = np.nanmin(scores), np.nanmax(scores)
    naive_img = ax_naive.imshow(np.full_like(scores, np.nan), cmap=cmap, vmin=vmin, vmax=vmax)
    done_cmap = LinearSegmentedColormap.from_list("done", [deck.PANEL, deck.MUTED])
    done_cmap.set_bad((0, 0, 0, 0))  # transparent where nothing was visited yet
    cmap_now = LinearSegmentedColormap.from_list("now", [deck.PANEL, deck.NAVY])
    cmap_now.set_bad((0, 0, 0, 0))
    # Tiles already visited are drawn faded: flash has discarded them; only the current one is held.
    done_img = ax_flash.imshow(np.full_like(scores, np.nan), cmap=done_cmap, vmin=vmin, vmax=vmax)
    flash_img = ax_flash.imshow(np.full_like(scores, np.nan), cmap=cmap_now, vmin=vmin, vmax=vmax)
    for ax in (ax_naive, ax_flash):
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        for edge in range(0, T + 1, block):  # tile grid
            ax.axhline(edge - 0.5, color=deck.MUTED, lw=0.6)
            ax.axvline(edge - 0.5, color=deck.MUTED, lw=0.6)
    tile_box = Rectangle((-0.5, -0.5), block, block, fill=False, ec=deck.GOLD, lw=4)
    ax_flash.add_patch(tile_box)
    naive_text = ax_naive.text(0.5, -0.1, "", transform=ax_naive.transAxes, ha="center",
                               va="top", color=deck.TEXT, fontsize=13)
    flash_text = ax_flash.text(0.5, -0.1, "", transform=ax_flash.transAxes, ha="center",
                               va="top", color=deck.TEXT, fontsize=13)

    rows = np.arange(block)
    m_bars = ax_m.bar(rows, np.zeros(block), color=deck.NAVY)
    l_bars = ax_l.bar(rows, np.zeros(block), color=deck.GOLD)
    deck.style_axes(ax_m, "running max m (per query row)")
    deck.style_axes(ax_l, "running sum l = sum exp(s - m)")
    ax_m.set_ylim(*m_lim)
    ax_l.set_ylim(*l_lim)
    for ax in (ax_m, ax_l):
        ax.set_xticks(rows)
        ax.set_xlabel("query row in the current tile")
    step_text = fig.text(0.5, 0.915, "", ha="center", va="top", color=deck.NAVY, fontsize=15)

    def update(frame):
        if frame < n_intro:  # naive: S = Q K^T appears, the whole matrix held at once
            shown = int(np.ceil(T * (frame + 1) / n_intro))
            partial = np.full_like(scores, np.nan)
            partial[:shown] = scores[:shown]
            naive_img.set_data(partial)
            naive_text.set_text(f"S = Q K^T: {shown * T:,} of {T * T:,} scores held\n ")
            step_text.set_text("naive attention materializes every score before the softmax")
            return
        naive_img.set_data(scores)
        naive_text.set_text(f"{T * T:,} scores held at once\n(and the probabilities, for backward): memory ~ T^2")
        i = min((frame - n_intro) // per_tile, n_tiles - 1)
        done = np.full_like(scores, np.nan)  # rebuilt every frame: update(frame) has no memory
        for s in steps[:i]:
            (q0, q1), (k0, k1) = s["q"], s["k"]
            done[q0:q1, k0:k1] = scores[q0:q1, k0:k1]
        step = steps[i]
        (q0, q1), (k0, k1) = step["q"], step["k"]
        current = np.full_like(scores, np.nan)
        current[q0:q1, k0:k1] = scores[q0:q1, k0:k1]
        done_img.set_data(done)
        flash_img.set_data(current)
        tile_box.set_xy((k0 - 0.5, q0 - 0.5))
        tile_box.set_width(k1 - k0)
        tile_box.set_height(q1 - q0)
        flash_text.set_text(f"held now: one {q1 - q0}x{k1 - k0} tile + m, l, acc per row\n"
                            f"tile {i + 1} of {n_tiles}; tiles above the diagonal skipped")
        for bar, value in zip(m_bars, np.pad(step["m"], (0, block - len(step["m"])))):
            bar.set_height(value)
        for bar, value in zip(l_bars, np.pad(step["l"], (0, block - len(step["l"])))):
            bar.set_height(value)
        last = k1 >= min(T, q1)
        step_text.set_text(
            f"queries {q0}-{q1 - 1}, keys {k0}-{k1 - 1}:  m <- max(m, rowmax S),  "
            f"l <- l * exp(m_old - m_new) + sum exp(S - m_new)"
            + ("\nlast tile of these rows:  out = acc / l,  save only L = m + log l" if last else "")
        )

    stills = (n_intro - 1, n_intro + (n_tiles // 2) * per_tile, n_frames - 1)
    deck.save(fig, update, n_frames, args, default_name=f"flash_tiling_T{T}_b{block}",
              still_frames=stills)


if __name__ == "__main__":
    main()
