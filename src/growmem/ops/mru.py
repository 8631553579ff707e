r"""Memory recurrent units as pure tensor functions: the BMRU switch and the LRU eigenvalues.

**BMRU (bistable memory recurrent unit), reconstructed.** De Geeter, Lambrechts, Ernst, Drion,
"Parallelizable memory recurrent units" (arXiv 2601.09495) introduce MRUs (RNNs whose state settles
on one of several stable states at every step, so information is kept indefinitely, while the update
stays compatible with the parallel scan) and the bistable BMRU as proof of concept; the follow-up
arXiv 2605.11855 describes BMRU as "quantized states with hysteresis". The paper's exact equations
were not available to us (only abstracts and introductions could be read), so this is a
*reconstruction* with the same properties. Per channel, with a switch drive z_t, a sign drive
v_t (both the same drive in the plain unit), a learned half-width theta > 0 of the hysteresis band and
a learned amplitude A > 0::

    s_t = 1[|z_t| > theta]                       (leave the band: switch)
    h_t = (1 - s_t) h_{t-1} + s_t A sign(v_t)    (else hold)

so h lives in {-A, +A} (after the first switch, or always with a quantized initial state), holds for
ever inside the band and is set by the sign of the drive outside it: a latch with hysteresis. Given
the inputs the update is linear in h, h_t = a_t h_{t-1} + b_t with a_t = 1 - s_t and
b_t = s_t A sign(v_t), so all t are computed by :func:`growmem.ops.scan.parallel_scan` (a_t = 0 at
switches is handled exactly).

The step function and sign have no useful gradient. ``mode`` picks what is computed:

* ``"hard"`` -- exact states (evaluation);
* ``"soft"`` -- smooth relaxation s_t = sigmoid((|z_t| - theta) / tau), sign(v) -> tanh(v / tau);
  the state is no longer exactly quantized;
* ``"ste"`` -- straight-through: the forward values are the hard ones (states exactly +-A), the
  backward uses the derivatives of the soft relaxation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BMRU_MODES", "bmru_coefficients", "quantized_state", "naive_bmru", "lru_eigenvalues",
           "lru_normalization", "lru_init"]

BMRU_MODES = ("hard", "soft", "ste")


def _check_mode(mode: str) -> None:
    if mode not in BMRU_MODES:
        raise ValueError(f"unknown BMRU mode {mode!r}; choose from {', '.join(BMRU_MODES)}")


def _relax(hard: Tensor, soft: Tensor, mode: str) -> Tensor:
    if mode == "hard":
        return hard
    if mode == "soft":
        return soft
    return hard + (soft - soft.detach())  # straight-through: hard values, soft derivatives


def bmru_coefficients(z: Tensor, v: Tensor, theta: Tensor, amplitude: Tensor, mode: str = "hard",
                      tau: float = 0.1) -> tuple[Tensor, Tensor]:
    """The scan coefficients of the BMRU: ``(a, b)`` with h_t = a_t h_{t-1} + b_t.

    Args:
        z: switch drive ``[..., N]``.
        v: sign drive, same shape (pass ``z`` for the single-drive unit).
        theta: half-width of the hysteresis band, broadcasting to ``[..., N]`` (> 0).
        amplitude: A, broadcasting likewise (> 0).
        mode: ``"hard"``, ``"soft"`` or ``"ste"`` (module docstring).
        tau: temperature of the relaxation (> 0).

    Returns:
        a = 1 - s (exactly 0 or 1 in ``hard``/``ste`` forward), b = s A sign(v).
    """
    _check_mode(mode)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    excess = z.abs() - theta
    s = _relax((excess > 0).to(z.dtype), torch.sigmoid(excess / tau), mode)
    sgn = _relax(torch.sign(v), torch.tanh(v / tau), mode)
    return 1 - s, s * amplitude * sgn


def quantized_state(logit: Tensor, amplitude: Tensor, mode: str = "hard") -> Tensor:
    """A quantized state A sign(c) (``hard``/``ste`` forward) with the surrogate A tanh(c)."""
    _check_mode(mode)
    return amplitude * _relax(torch.sign(logit), torch.tanh(logit), mode)


def naive_bmru(z: Tensor, theta: Tensor, amplitude: Tensor, h0: Tensor | None = None,
               v: Tensor | None = None) -> Tensor:
    """Hard BMRU by its definition, a python loop with explicit branches (test reference).

    z, v ``[B, T, N]``; theta, amplitude ``[N]``; h0 ``[B, N]`` (None = zeros). Returns h ``[B, T, N]``.
    """
    v = z if v is None else v
    h = torch.zeros_like(z[:, 0]) if h0 is None else h0.clone()
    out = []
    for t in range(z.shape[1]):
        up = (z[:, t].abs() > theta) & (v[:, t] > 0)
        down = (z[:, t].abs() > theta) & (v[:, t] < 0)
        zero = (z[:, t].abs() > theta) & (v[:, t] == 0)
        h = torch.where(up, amplitude.expand_as(h), torch.where(down, -amplitude.expand_as(h), h))
        h = torch.where(zero, torch.zeros_like(h), h)
        out.append(h)
    return torch.stack(out, 1)


# ----------------------------------------------------------------------------------------------
# LRU (Orvieto et al. 2023, "Resurrecting recurrent neural networks for long sequences")
# ----------------------------------------------------------------------------------------------

def lru_eigenvalues(nu_log: Tensor, theta_log: Tensor) -> Tensor:
    """lambda = exp(-exp(nu_log) + i exp(theta_log)): |lambda| = exp(-exp(nu_log)) < 1 always."""
    return torch.exp(torch.complex(-torch.exp(nu_log), torch.exp(theta_log)))


def lru_normalization(nu_log: Tensor) -> Tensor:
    """gamma = sqrt(1 - |lambda|^2) = sqrt(-expm1(-2 exp(nu_log))) (stable near |lambda| = 1)."""
    return torch.sqrt(-torch.expm1(-2 * torch.exp(nu_log)))


def lru_init(n: int, r_min: float = 0.9, r_max: float = 0.999, max_phase: float = 2 * math.pi,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Ring initialization: |lambda| uniform on the ring r_min <= |lambda| <= r_max (uniform in area),
    phase uniform in [0, max_phase]. Returns ``(nu_log, theta_log)`` of shape ``[n]``."""
    if not 0 <= r_min < r_max < 1:
        raise ValueError(f"need 0 <= r_min < r_max < 1, got r_min={r_min}, r_max={r_max}")
    if not max_phase > 0:
        raise ValueError(f"max_phase must be > 0, got {max_phase}")
    u1 = torch.rand(n, generator=generator, dtype=torch.float64)
    u2 = torch.rand(n, generator=generator, dtype=torch.float64).clamp_min(1e-12)
    nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))
    theta_log = torch.log(max_phase * u2)
    return nu_log.float(), theta_log.float()
