"""Image-quality metrics of the evaluators (shapes-bench and the multi-view bench): one PSNR, one SSIM."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_CAP = 100.0
SSIM_SIGMA, SSIM_RADIUS = 1.5, 5  # Wang et al.'s Gaussian window (11 x 11), as scikit-image's gaussian_weights


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images/videos in [-1, 1] (measured on [0, 1]); capped at PSNR_CAP."""
    mse = (((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) / 2) ** 2).mean().item()
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(1 / mse))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM of two images `(3, H, W)` in [-1, 1], on [0, 1] per channel with an 11x11 Gaussian window (sigma
    1.5), population covariances, mean over the window positions that fit the image and the channels."""
    x, y = ((t.double()[:, None] + 1) / 2 for t in (a, b))   # (3, 1, H, W)
    g = torch.exp(-torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64).square() / (2 * SSIM_SIGMA ** 2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]
    blur = lambda t: F.conv2d(t, window)
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())
