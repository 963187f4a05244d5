"""The roofline model's arithmetic, and the facts about the machine that minitrain.profile needs.

What: `mfu(tokens_per_s, flops_per_token, peak)` is Model FLOPs Utilization; `roofline(I, peak,
bandwidth)` is the attainable FLOP/s at arithmetic intensity I; `ridge_point(peak, bandwidth)` is
where the roofline bends; `vendor_peak_flops(name)` is a datasheet peak, for reference only;
`device_name` and `default_cache_path` say which machine a measured peak belongs to and where it
is cached.

Why a separate file: these are pure formulas and lookups (no measuring, no FLOP counting);
minitrain/profile.py keeps the teaching text (MFU, the roofline, the common bugs), the FLOP
counter and the measured ceilings `peak_flops` / `peak_bandwidth`, and re-exports every name
here: `from minitrain.profile import mfu, ridge_point` keeps working.

Formula:
    MFU = tokens_per_s * flops_per_token / peak_flops
    attainable(I) = min(peak_flops, I * peak_bandwidth),   ridge I* = peak_flops / peak_bandwidth

Common bug: dividing by a datasheet peak (often sparse or bf16) for an fp32 CPU run: MFU must be
against the peak of the dtype and thread count you ran, i.e. the MEASURED `peak_flops`.
"""
import math
import os
import pathlib
import platform

import torch


def default_cache_path():
    """~/.cache/minitrain/peaks.json (or $MINITRAIN_CACHE_DIR/peaks.json): the measured peaks
    belong to the machine, not to a checkout, so they live in the user's cache folder."""
    root = os.environ.get("MINITRAIN_CACHE_DIR") or pathlib.Path.home() / ".cache" / "minitrain"
    return pathlib.Path(root) / "peaks.json"


def device_name(device="cpu"):
    """The CPU model (from /proc/cpuinfo) or the CUDA device name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def mfu(tokens_per_s, flops_per_token, peak):
    """Model FLOPs Utilization = tokens_per_s * flops_per_token / peak (a fraction, 0.4 = 40%)."""
    for name, value in (("tokens_per_s", tokens_per_s), ("flops_per_token", flops_per_token)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (isinstance(peak, (int, float)) and math.isfinite(peak) and peak > 0):
        raise ValueError(f"peak must be a finite FLOP/s > 0 (use peak_flops()), got {peak!r}")
    return tokens_per_s * flops_per_token / peak


def roofline(intensity, peak, bandwidth):
    """Attainable FLOP/s at arithmetic intensity `intensity` (FLOP/byte): min(peak, I x bw)."""
    return min(peak, intensity * bandwidth)


def ridge_point(peak, bandwidth):
    """The intensity (FLOP/byte) where the roofline bends: below it an op is memory-bound."""
    return peak / bandwidth


# Dense (no sparsity) datasheet peaks in FLOP/s, for REFERENCE next to the measured peak only.
# Order matters: the first name contained in the device name wins ("A100" before "A10").
VENDOR_PEAKS = [  # (name, fp32 non-tensor, bf16/fp16 tensor core)
    ("H200", 67e12, 989e12), ("H100 PCIe", 51e12, 756e12), ("H100", 67e12, 989e12),
    ("A100", 19.5e12, 312e12), ("A10G", 31.2e12, 70e12), ("A10", 31.2e12, 125e12),
    ("L40S", 91.6e12, 362e12), ("L4", 30.3e12, 121e12), ("V100", 15.7e12, 125e12),
    ("T4", 8.1e12, 65e12), ("RTX 4090", 82.6e12, 165e12), ("RTX 3090", 35.6e12, 71e12),
]


def vendor_peak_flops(name, dtype=torch.bfloat16):
    """The datasheet's dense peak for a CUDA device name ("NVIDIA A100-SXM4-80GB"), or None when
    the device is not in the table: never one A100 number for every GPU."""
    for key, fp32, half in VENDOR_PEAKS:
        if name and key in name:
            return fp32 if dtype == torch.float32 else half
    return None
