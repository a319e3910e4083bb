"""InstDisc losses over a memory bank: NCE with a fixed partition constant, and the full non-parametric softmax.

Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
https://arxiv.org/abs/1805.01978 (code: zhirongw/lemniscate.pytorch, ``lib/NCEAverage.py``, ``lib/NCECriterion.py``,
``lib/LinearAverage.py``). docs/reference.md §1.

Pure functions: the caller gathers the bank rows, draws the noise and all-reduces the partition estimate.
Inputs are *logits* ``s = v·f/τ``; probabilities are formed in float32 as ``P = exp(s − log Z)``, so the functions
are safe under bf16/fp16 autocast (``exp(s)`` reaches ~1.6e6 at τ = 0.07, beyond what fp16 holds).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: the constant lemniscate's NCECriterion adds to every denominator
NCE_EPS = 1e-7


def check_on_device(condition: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` unless every element of the bool tensor ``condition`` holds, without reading it
    back to the host: ``torch._assert_async`` raises at once on the CPU, and on a GPU the check runs as a kernel that
    fails the next CUDA call (a device-side assertion) instead of making the host wait for the device every step."""
    try:
        torch._assert_async(condition.all(), message)
    except RuntimeError as err:
        raise ValueError(message) from err


def partition_estimate(logits: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The local Monte-Carlo estimate of Z = Σ_i exp(v_i·f/τ): ``n · mean(exp(s))`` over all scores given.

    logits: (N, 1+m) scores ``v·f/τ`` (positive and noise columns alike, as the official code averages them all).
    Returns a float32 scalar without gradient. Under DDP the caller all-reduces the *mean* of ``exp(s)`` (every
    process holds the same N·(1+m) scores) before multiplying by n.
    """
    return num_samples * logits.detach().float().exp().mean()


def nce_loss(logits: torch.Tensor, z: torch.Tensor | float, num_samples: int, eps: float = NCE_EPS) -> torch.Tensor:
    """InstDisc's NCE loss (Gutmann & Hyvärinen's binary noise-vs-data classification), mean over the N anchors.

    Args:
        logits: (N, 1+m) scores ``s = v·f/τ``; column 0 is the positive (the anchor's own bank entry), columns
            1..m the noise entries drawn uniformly from the bank.
        z: the partition constant Z (> 0), so that ``P(i|f) = exp(s_i)/Z``.
        num_samples: n, the bank size; the noise distribution is uniform, ``P_n = 1/n``.
        eps: added to each denominator as in ``lib/NCECriterion.py``.

    With ``h(i, f) = P(i|f) / (P(i|f) + m·P_n + eps)``:
    ``L = −(1/N) Σ_b [ log h(pos_b, f_b) + Σ_j log(1 − h(j, f_b)) ]``, where ``1 − h`` is computed as
    ``m·P_n / (P + m·P_n + eps)`` exactly as the code does. Returns a float32 scalar.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"nce_loss expects (N, 1+m) scores with m >= 1 noise columns, got {tuple(logits.shape)}")
    # A NaN Z (estimated from NaN features) is let through: the loss is then NaN and the run stops with the
    # non-finite-loss guard's error and advice, not with a "Z must be > 0" that points at the wrong thing.
    if not torch.is_tensor(z):
        if z <= 0:
            raise ValueError(f"the partition constant Z must be > 0, got {z}")
        z = torch.tensor(z, dtype=torch.float32, device=logits.device)
    else:  # checked on the device, never read back (a per-step read would stall the host on a GPU)
        z = z.to(dtype=torch.float32, device=logits.device)
        check_on_device(
            ~(z <= 0),
            "the partition constant Z must be > 0 (a tensor Z is checked on its device, so "
            "its value cannot be shown here)",
        )
    m = logits.shape[1] - 1
    noise_mass = m / num_samples  # m · P_n
    log_p = logits.float() - z.log()  # log P(i|f), exact even where P underflows
    log_denom = torch.logaddexp(log_p, log_p.new_tensor(noise_mass + eps).log())  # log(P + m·P_n + eps)
    log_h_pos = log_p[:, 0] - log_denom[:, 0]  # log h(pos, f)
    log_1mh_noise = math.log(noise_mass) - log_denom[:, 1:]  # log(1 − h(j, f))
    return -(log_h_pos.sum() + log_1mh_noise.sum()) / logits.shape[0]


def bank_softmax_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The full non-parametric softmax (``--nce-k 0``, ``lib/LinearAverage.py`` + cross-entropy).

    logits: (N, n) scores ``v_j·f/τ`` against every bank entry; targets: (N,) the anchors' own bank rows.
    ``L = −(1/N) Σ_b log( exp(s_{b, i_b}) / Σ_j exp(s_{b, j}) )``, in float32.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"bank_softmax_loss expects (N, n) logits and (N,) targets, got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    return F.cross_entropy(logits.float(), targets)
