r"""The BMRU as a :class:`~growmem.memories.base.Memory`, so that the linear-mixer layer and Memory
Caching (:class:`~growmem.caching.CachedMemory`) work on it unchanged.

View it as a *diagonal* matrix memory S_t = diag(h_t) whose diagonal is a bank of bistable latches
(see :mod:`growmem.ops.mru` for the BMRU itself, a reconstruction of arXiv 2601.09495). Per head, with
q, k ``[K]`` (L2-normalized by the layer) and v ``[V]``, K = V::

    s_t = 1[|sqrt(K) k_t| > theta]                          (drive="kv": the key opens the latch)
    h_t = (1 - s_t) * h_{t-1} + s_t * A * sign(v_t)          (the value sets it)
    o_t = diag(h_t) q_t = q_t * h_t                          (the query reads it, elementwise)

h_0 = A sign(c) with a learned c (``init_state="learned"``, so every state is exactly +-A at
evaluation) or 0 (``"zeros"``). ``sqrt(K) k`` has unit RMS, so theta is on the scale of a unit-variance
drive. ``drive="v"`` is the single-drive unit of the BMRU paper (s_t = 1[|v_t| > theta], sign(v_t));
then k serves only Memory Caching's pooled keys.

Why k drives the switch by default: in the single-drive form k is used by nothing but GRM/SSC's
pooled keys, so under Residual / average caching k's projection would be dead weight; as a
write-enable address it plays the role k plays in a matrix memory (where k picks the rows that
v is written to). With k = v the two forms coincide.

Readable state: the 1-tuple ``(h,)`` with h ``[B, H, V]``; stacked states are ``(h [B, N, H, V],)``
and ``read`` returns ``q[:, :, None] * h[:, None]`` (``[B, T, N, H, V]``). The readout is linear in
the state (``linear_readout = True``: Residual sums states, Soup equals GRM); the state is a tuple and
not a bare tensor so that the wrapper takes its generic pytree paths (its bare-tensor fast paths
assume ``[B, H, K, V]`` matrices).

Training vs evaluation: ``module.training`` selects the surrogate (``"ste"``: hard forward,
soft-relaxation gradients; or ``"soft"``), ``eval()`` computes the exact hard latch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from growmem.memories.base import Gates, Memory
from growmem.ops.mru import bmru_coefficients, quantized_state
from growmem.ops.scan import parallel_scan
from growmem.ops.utils import check_finite, check_qkv

__all__ = ["BMRUMemory"]

SURROGATES = ("ste", "soft")


def check_bmru_options(surrogate: str, tau: float, theta_range: tuple[float, float], init_state: str) -> None:
    """Validate the options shared by the BMRU memory and the BMRU cell."""
    if surrogate not in SURROGATES:
        raise ValueError(f"BMRU surrogate must be one of {', '.join(SURROGATES)}, got {surrogate!r}")
    if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
        raise ValueError(f"BMRU tau must be a positive number, got {tau!r}")
    lo, hi = theta_range
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"BMRU theta_range must satisfy 0 < lo <= hi, got {theta_range!r}")
    if init_state not in ("learned", "zeros"):
        raise ValueError(f"BMRU init_state must be 'learned' or 'zeros', got {init_state!r}")


def init_bmru_parameters(module: nn.Module, shape: tuple[int, ...], theta_range: tuple[float, float],
                         init_state: str) -> None:
    """log_theta (log-uniform in theta_range), log_amplitude (A = 1) and, if learned, the initial-state
    logits c = +-1 (random signs) as parameters of ``module``."""
    lo, hi = theta_range
    u = torch.rand(shape)
    module.log_theta = nn.Parameter(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    module.log_amplitude = nn.Parameter(torch.zeros(shape))
    if init_state == "learned":
        module.h0_logit = nn.Parameter(torch.where(torch.rand(shape) < 0.5, -1.0, 1.0))
    else:
        module.register_parameter("h0_logit", None)


class BMRUMemory(Memory):
    """Bistable memory recurrent unit as a diagonal memory read by q (see the module docstring).

    Args:
        num_heads, head_k_dim, head_v_dim: H, K, V (K must equal V).
        chunk_size: the grid of ``return_chunk_states`` (the scan itself is not chunked).
        drive: ``"kv"`` (k switches, v sets the sign) or ``"v"`` (v does both).
        surrogate: training-time gradient surrogate, ``"ste"`` or ``"soft"``.
        tau: temperature of the relaxation.
        theta_range: initial band half-widths, log-uniform.
        init_state: ``"learned"`` (h_0 = A sign(c)) or ``"zeros"``.
        scan_method: forward algorithm of :func:`~growmem.ops.scan.parallel_scan`.
    """

    name = "bmru"
    gate_features: dict[str, int] = {}
    l2_normalize_qk = True
    linear_readout = True

    def __init__(self, num_heads: int, head_k_dim: int, head_v_dim: int, chunk_size: int = 64, drive: str = "kv",
                 surrogate: str = "ste", tau: float = 0.1, theta_range: tuple[float, float] = (0.5, 2.0),
                 init_state: str = "learned", scan_method: str = "blelloch") -> None:
        super().__init__(num_heads, head_k_dim, head_v_dim, chunk_size)
        if head_k_dim != head_v_dim:
            raise ValueError(f"BMRUMemory reads its state elementwise with q and needs head_k_dim == head_v_dim, "
                             f"got {head_k_dim} and {head_v_dim}")
        if drive not in ("kv", "v"):
            raise ValueError(f"BMRU drive must be 'kv' or 'v', got {drive!r}")
        check_bmru_options(surrogate, tau, theta_range, init_state)
        self.drive, self.surrogate, self.tau = drive, surrogate, float(tau)
        self.init_state, self.scan_method = init_state, scan_method
        init_bmru_parameters(self, (num_heads, head_v_dim), theta_range, init_state)

    @property
    def mode(self) -> str:
        """``"hard"`` in eval mode, else the training surrogate."""
        return self.surrogate if self.training else "hard"

    @property
    def scale(self) -> float:
        return 1.0

    def _coefficients(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of the scan, in float32 for half-precision inputs."""
        dt = v.dtype if v.dtype in (torch.float32, torch.float64) else torch.float32
        k, v = k.to(dt), v.to(dt)
        z = k * math.sqrt(self.head_k_dim) if self.drive == "kv" else v
        theta = self.log_theta.exp().to(v.dtype)
        amp = self.log_amplitude.exp().to(v.dtype)
        return bmru_coefficients(z, v, theta, amp, self.mode, self.tau)

    def initial_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """h_0 ``[B, H, V]``: A sign(c) (learned) or zeros."""
        H, V = self.num_heads, self.head_v_dim
        if self.h0_logit is None:
            return torch.zeros(batch_size, H, V, dtype=dtype, device=device)
        h0 = quantized_state(self.h0_logit.to(dtype), self.log_amplitude.exp().to(dtype), self.mode)
        return h0.expand(batch_size, H, V)

    def _state(self, state: Any, B: int, ref: torch.Tensor) -> torch.Tensor:
        if state is None:
            dt = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
            return self.initial_state(B, dt, ref.device)
        want = (B, self.num_heads, self.head_v_dim)
        if not isinstance(state, torch.Tensor) or state.shape != want:
            raise ValueError(f"BMRU state must be a tensor of shape [B, H, V] = {want}, "
                             f"got {getattr(state, 'shape', type(state).__name__)}")
        check_finite("initial_state", state)
        return state

    def forward(self, q, k, v, gates: Gates, initial_state=None, output_final_state=False, return_chunk_states=False):
        B, T, *hkv = check_qkv(q, k, v)
        if hkv != [self.num_heads, self.head_k_dim, self.head_v_dim]:
            raise ValueError(f"BMRUMemory expects H={self.num_heads}, K=V={self.head_v_dim}, got q {tuple(q.shape)}, "
                             f"v {tuple(v.shape)}")
        h0 = self._state(initial_state, B, v)
        a, b = self._coefficients(k, v)
        h = parallel_scan(a, b, h0, method=self.scan_method)  # [B, T, H, V]
        o = (q * h).to(q.dtype)
        final = h[:, -1].clone() if output_final_state or return_chunk_states else None  # (not a view of all h)
        if not return_chunk_states:
            return o, final
        cs = self.chunk_size
        idx = list(range(cs - 1, T, cs)) + ([T - 1] if T % cs else [])
        return o, final, (h[:, idx],)

    def step(self, q, k, v, gates: Gates, state):
        h0 = self._state(state, q.shape[0], v)
        a, b = self._coefficients(k, v)
        h = a * h0 + b
        return (q * h).to(q.dtype), h

    def readable(self, state: Any) -> tuple[torch.Tensor]:
        return (state,)

    def read(self, states: Any, q: torch.Tensor) -> torch.Tensor:
        """``states = (h [B, N, H, V],)``, q ``[B, T, H, V]`` -> ``q[:, :, None] * h[:, None]`` ``[B, T, N, H, V]``."""
        (h,) = states
        return (q[:, :, None] * h[:, None]).to(q.dtype)

    def state_size(self) -> int:
        return self.num_heads * self.head_v_dim
