"""DINO's loss and teacher-temperature schedule (Caron et al. 2021, https://arxiv.org/abs/2104.14294;
facebookresearch/dino ``main_dino.py: DINOLoss``).

Pure functions: the centre is an input (the objective owns it as a buffer and updates it after the loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dino_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """Cross-entropy between centred, sharpened teacher distributions and student distributions.

    ``P_t = softmax((g_t − c)/τ_t)`` (detached), ``P_s = softmax(g_s/τ_s)``;
    ``L = (1/(2V−2)) Σ_{i∈{0,1}} Σ_{v≠i} mean_b[ −Σ_k P_t(x_i)_k · log P_s(x_v)_k ]``: each teacher global crop i
    against every *other* student crop (no same-view pair), averaged over the ``2·V − 2`` pairs.

    Args:
        student: (V, N, K) student logits of all V crops, global crops first.
        teacher: (G, N, K) raw teacher logits of the G global crops (G = 2 in DINO; G ≤ V); no gradient flows.
        center: (K,) or (1, K) the running centre c of the teacher logits.
        student_temp: τ_s (0.1). teacher_temp: τ_t of this epoch (see :func:`teacher_temperature`).

    Returns a float32 scalar (float64 when the logits are float64): computed in at least float32 under autocast.
    """
    if student.ndim != 3 or teacher.ndim != 3 or student.shape[1:] != teacher.shape[1:]:
        raise ValueError(
            f"dino_cross_entropy expects student (V, N, K) and teacher (G, N, K) with matching N, K; "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    num_crops, num_global = student.shape[0], teacher.shape[0]
    if num_global > num_crops or num_crops < 2:
        raise ValueError(
            f"DINO needs >= 2 student crops and no more teacher crops than student crops; got "
            f"{num_crops} student and {num_global} teacher crops"
        )
    dtype = torch.promote_types(student.dtype, torch.float32)
    p_t = F.softmax((teacher.detach().to(dtype) - center.to(dtype).reshape(1, 1, -1)) / teacher_temp, dim=-1)
    log_p_s = F.log_softmax(student.to(dtype) / student_temp, dim=-1)
    total = student.new_zeros((), dtype=dtype)
    terms = 0
    for i in range(num_global):
        for v in range(num_crops):
            if v == i:  # same view seen by both networks: skipped
                continue
            total = total - (p_t[i] * log_p_s[v]).sum(-1).mean()
            terms += 1
    return total / terms


def teacher_temperature(epoch: int, warmup_temp: float = 0.04, temp: float = 0.04, warmup_epochs: int = 0) -> float:
    """τ_t of ``epoch``: ``np.linspace(warmup_temp, temp, warmup_epochs)[epoch]`` during warm-up, then ``temp``.

    Indexed by *epoch*, not step, exactly as DINO's ``teacher_temp_schedule`` (the linspace includes its end point,
    so the last warm-up epoch already uses ``temp``). README: τ_t above 0.07 is unstable.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if epoch >= warmup_epochs:
        return temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)
