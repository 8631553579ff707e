r"""Memory recurrent units as token mixers: BMRU (persistent memory), LRU (transient memory), and
their hybrid with both kinds of channels side by side.

Cells (per-channel recurrences, computed for all t with :func:`growmem.ops.scan.parallel_scan`):

* :class:`BMRUCell` -- the bistable memory recurrent unit (a reconstruction of De Geeter et al.,
  arXiv 2601.09495; equations in :mod:`growmem.ops.mru`). Drive z_t = W x_t + b ``[N]``;
  s_t = 1[|z_t| > theta]; h_t = (1 - s_t) h_{t-1} + s_t A sign(z_t); features h_t ``[N]``.
* :class:`LRUCell` -- the linear recurrent unit (Orvieto et al. 2023): complex diagonal
  h_t = lambda * h_{t-1} + gamma * (B x_t), lambda = exp(-exp(nu) + i exp(theta)),
  gamma = sqrt(1 - |lambda|^2); features y_t = Re(C h_t) + D * x_t ``[D_model]``.

Mixers (:class:`MRUMixer`; ``BMRUMixer``, ``LRUMixer``, ``HybridMRUMixer`` choose the channels)::

    f_t = concat(BMRU h_t [N_b], LRU y_t [D])           (the parts present)
    y_t = W_o (f_t * silu(W_g x_t))                     (output gate optional)

Decoding: the cache holds the last state of each cell (``{"bmru": [B, N_b], "lru": complex [B, N_l]}``);
feeding a sequence in pieces equals one call. BMRU channels compute exact hard states in ``eval()``
and use their surrogate in ``train()`` (see :class:`BMRUCell`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from growmem.layers.base import Cache, TokenMixer
from growmem.memories.mru import check_bmru_options, init_bmru_parameters
from growmem.ops.mru import bmru_coefficients, lru_eigenvalues, lru_init, lru_normalization, quantized_state
from growmem.ops.scan import SCAN_METHODS, parallel_scan
from growmem.ops.utils import check_finite

__all__ = ["BMRUCell", "LRUCell", "MRUMixer", "BMRUMixer", "LRUMixer", "HybridMRUMixer"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrences run in float32 (or float64) even for half-precision inputs."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _check_state(name: str, h: torch.Tensor, shape: tuple[int, ...], complex_: bool) -> None:
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != shape or h.is_complex() != complex_:
        kind = "complex " if complex_ else ""
        raise ValueError(f"{name} state must be a {kind}tensor of shape {shape}, got "
                         f"{getattr(h, 'shape', type(h).__name__)} {getattr(h, 'dtype', '')}")
    if not torch.isfinite(h).all():
        raise ValueError(f"{name} state contains NaN or Inf")


class BMRUCell(nn.Module):
    r"""Bistable memory recurrent unit on N channels (reconstruction; see :mod:`growmem.ops.mru`).

    z_t = W x_t + b; s_t = 1[|z_t| > theta]; h_t = (1 - s_t) h_{t-1} + s_t A sign(z_t).

    theta = exp(log_theta) > 0 and A = exp(log_amplitude) > 0 are learned per channel. h_0 is
    A sign(c) with learned logits c (``init_state="learned"``: every state is exactly +-A) or 0
    (``"zeros"``: 0 until a channel first switches). W is a parameter of its own (not an ``nn.Linear``),
    initialized with std D^-1/2 so that the drive has about unit variance for unit-RMS inputs, which is
    the scale of ``theta_range``; models that re-initialize every ``nn.Linear`` leave it alone.

    Gradients: in ``train()`` mode ``surrogate="ste"`` keeps the hard forward (states exactly +-A) and
    back-propagates through s ~ sigmoid((|z| - theta) / tau), sign(z) ~ tanh(z / tau), h_0 ~ A tanh(c);
    ``surrogate="soft"`` computes with those relaxations (states then not exactly quantized). In
    ``eval()`` mode the exact hard recurrence is computed.

    Args:
        d_in: input width D.
        n_state: channels N.
        surrogate, tau, theta_range, init_state: as above.
        scan_method: forward algorithm of the scan.
    """

    def __init__(self, d_in: int, n_state: int, surrogate: str = "ste", tau: float = 0.1,
                 theta_range: tuple[float, float] = (0.5, 2.0), init_state: str = "learned",
                 scan_method: str = "blelloch") -> None:
        super().__init__()
        if d_in < 1 or n_state < 1:
            raise ValueError(f"BMRUCell needs d_in >= 1 and n_state >= 1, got {d_in}, {n_state}")
        check_bmru_options(surrogate, tau, theta_range, init_state)
        if scan_method not in SCAN_METHODS:
            raise ValueError(f"unknown scan method {scan_method!r}")
        self.d_in, self.n_state = d_in, n_state
        self.surrogate, self.tau, self.init_state, self.scan_method = surrogate, float(tau), init_state, scan_method
        self.weight = nn.Parameter(torch.randn(n_state, d_in) * d_in ** -0.5)
        self.bias = nn.Parameter(torch.zeros(n_state))
        init_bmru_parameters(self, (n_state,), theta_range, init_state)

    @property
    def mode(self) -> str:
        return self.surrogate if self.training else "hard"

    @property
    def theta(self) -> torch.Tensor:
        return self.log_theta.exp()

    @property
    def amplitude(self) -> torch.Tensor:
        return self.log_amplitude.exp()

    def drive(self, x: torch.Tensor) -> torch.Tensor:
        """z = W x + b: ``[B, T, D]`` -> ``[B, T, N]``."""
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def initial_state(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """h_0 ``[B, N]``."""
        if self.h0_logit is None:
            return torch.zeros(batch_size, self.n_state, dtype=dtype, device=device)
        h0 = quantized_state(self.h0_logit.to(dtype), self.amplitude.to(dtype), self.mode)
        return h0.expand(batch_size, self.n_state)

    def forward_drive(self, z: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        """States from a given drive z ``[B, T, N]`` (``h0 [B, N]``, None = the cell's h_0) -> h ``[B, T, N]``
        (float32 for half-precision drives)."""
        z = z.to(_compute_dtype(z.dtype))
        if h0 is None:
            h0 = self.initial_state(z.shape[0], z.dtype, z.device)
        a, b = bmru_coefficients(z, z, self.theta.to(z.dtype), self.amplitude.to(z.dtype), self.mode, self.tau)
        return parallel_scan(a, b, h0, method=self.scan_method)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        """x ``[B, T, D]`` -> all states h ``[B, T, N]`` (``h[:, -1]`` continues the stream)."""
        return self.forward_drive(self.drive(x), h0)


class LRUCell(nn.Module):
    r"""Linear recurrent unit (Orvieto et al. 2023, "Resurrecting recurrent neural networks for long
    sequences") on N complex channels.

    h_t = diag(lambda) h_{t-1} + gamma * (B x_t),  y_t = Re(C h_t) + D * x_t, with the stable
    exponential parameterization lambda = exp(-exp(nu_log) + i exp(theta_log)) (|lambda| < 1 for every
    parameter value), gamma = sqrt(1 - |lambda|^2) (so a white-noise input keeps unit variance), ring
    initialization r_min <= |lambda| <= r_max and phases in [0, max_phase]. B ``[N, D]`` and
    C ``[D, N]`` are complex (stored as real and imaginary parts, Glorot-like init as in the paper),
    D ``[D]`` real. h_0 = 0.

    Args:
        d_model: input and output width D.
        n_state: complex channels N.
        r_min, r_max, max_phase: ring initialization.
        scan_method: forward algorithm of the (complex) scan.
    """

    def __init__(self, d_model: int, n_state: int, r_min: float = 0.9, r_max: float = 0.999,
                 max_phase: float = 2 * math.pi, scan_method: str = "blelloch") -> None:
        super().__init__()
        if d_model < 1 or n_state < 1:
            raise ValueError(f"LRUCell needs d_model >= 1 and n_state >= 1, got {d_model}, {n_state}")
        if scan_method not in SCAN_METHODS:
            raise ValueError(f"unknown scan method {scan_method!r}")
        self.d_model, self.n_state, self.scan_method = d_model, n_state, scan_method
        nu_log, theta_log = lru_init(n_state, r_min, r_max, max_phase)
        self.nu_log = nn.Parameter(nu_log)
        self.theta_log = nn.Parameter(theta_log)
        self.B_re = nn.Parameter(torch.randn(n_state, d_model) / math.sqrt(2 * d_model))
        self.B_im = nn.Parameter(torch.randn(n_state, d_model) / math.sqrt(2 * d_model))
        self.C_re = nn.Parameter(torch.randn(d_model, n_state) / math.sqrt(n_state))
        self.C_im = nn.Parameter(torch.randn(d_model, n_state) / math.sqrt(n_state))
        self.D = nn.Parameter(torch.randn(d_model))

    @property
    def eigenvalues(self) -> torch.Tensor:
        """lambda ``[N]`` (complex)."""
        return lru_eigenvalues(self.nu_log, self.theta_log)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, T, D]`` (real), h0 ``[B, N]`` complex (None = 0) -> (y ``[B, T, D]``, h ``[B, T, N]`` complex).
        Half-precision inputs are computed in float32 (complex64); y is cast back to x's dtype."""
        dt = _compute_dtype(x.dtype)
        x_in, x = x, x.to(dt)
        lam = lru_eigenvalues(self.nu_log.to(dt), self.theta_log.to(dt))
        gamma = lru_normalization(self.nu_log.to(dt))
        bx = torch.complex(F.linear(x, self.B_re.to(dt)), F.linear(x, self.B_im.to(dt))) * gamma
        h = parallel_scan(lam, bx, h0, method=self.scan_method)
        # Re(C h) = C_re Re(h) - C_im Im(h)
        y = F.linear(h.real, self.C_re.to(dt)) - F.linear(h.imag, self.C_im.to(dt)) + self.D.to(dt) * x
        return y.to(x_in.dtype), h


class MRUMixer(TokenMixer):
    """Token mixer over BMRU channels, LRU channels, or both side by side (see the module docstring).

    Args:
        d_model: D.
        n_bmru: BMRU channels (0 = none).
        n_lru: LRU complex channels (0 = none).
        use_output_gate: multiply the features by silu(W_g x) before the output projection.
        bmru_kwargs: options of :class:`BMRUCell` (surrogate, tau, theta_range, init_state, scan_method).
        lru_kwargs: options of :class:`LRUCell` (r_min, r_max, max_phase, scan_method).
    """

    def __init__(self, d_model: int, n_bmru: int, n_lru: int, use_output_gate: bool = True,
                 bmru_kwargs: dict | None = None, lru_kwargs: dict | None = None) -> None:
        super().__init__()
        if d_model < 1 or n_bmru < 0 or n_lru < 0 or n_bmru + n_lru == 0:
            raise ValueError(f"MRUMixer needs d_model >= 1 and n_bmru, n_lru >= 0 (not both 0), "
                             f"got {d_model}, {n_bmru}, {n_lru}")
        self.d_model, self.n_bmru, self.n_lru = d_model, n_bmru, n_lru
        self.bmru = BMRUCell(d_model, n_bmru, **(bmru_kwargs or {})) if n_bmru else None
        self.lru = LRUCell(d_model, n_lru, **(lru_kwargs or {})) if n_lru else None
        n_feat = n_bmru + (d_model if n_lru else 0)
        self.use_output_gate = use_output_gate
        self.g_proj = nn.Linear(d_model, n_feat, bias=False) if use_output_gate else None
        self.o_proj = nn.Linear(n_feat, d_model, bias=False)

    def _states(self, cache: Cache | None, B: int):
        hb = hl = None
        if cache:
            if not isinstance(cache, dict):
                raise TypeError(f"MRUMixer cache must be a dict, got {type(cache).__name__}")
            if self.bmru is not None and cache.get("bmru") is not None:
                hb = cache["bmru"]
                _check_state("bmru", hb, (B, self.n_bmru), False)
            if self.lru is not None and cache.get("lru") is not None:
                hl = cache["lru"]
                _check_state("lru", hl, (B, self.n_lru), True)
        return hb, hl

    def forward(self, x: torch.Tensor, cache: Cache | None = None,
                use_cache: bool = False) -> tuple[torch.Tensor, Cache | None]:
        self.check_input(x, self.d_model)
        check_finite("mixer input", x)
        hb0, hl0 = self._states(cache, x.shape[0])
        feats, new = [], {}
        if self.bmru is not None:
            hb = self.bmru(x, hb0)
            feats.append(hb.to(x.dtype))
            new["bmru"] = hb[:, -1].clone()  # (a view would keep all of h alive)
        if self.lru is not None:
            yl, hl = self.lru(x, hl0)
            feats.append(yl)
            new["lru"] = hl[:, -1].clone()
        f = torch.cat(feats, -1) if len(feats) > 1 else feats[0]
        if self.g_proj is not None:
            f = f * F.silu(self.g_proj(x))
        y = self.o_proj(f)
        return (y, new) if use_cache else (y, None)


class BMRUMixer(MRUMixer):
    """BMRU channels only: persistent memory. ``n_state`` channels (default D)."""

    def __init__(self, d_model: int, n_state: int | None = None, use_output_gate: bool = True, **bmru_kwargs) -> None:
        super().__init__(d_model, n_state or d_model, 0, use_output_gate, bmru_kwargs=bmru_kwargs)


class LRUMixer(MRUMixer):
    """LRU channels only: transient memory. ``n_state`` complex channels (default D)."""

    def __init__(self, d_model: int, n_state: int | None = None, use_output_gate: bool = True, **lru_kwargs) -> None:
        super().__init__(d_model, 0, n_state or d_model, use_output_gate, lru_kwargs=lru_kwargs)


class HybridMRUMixer(MRUMixer):
    """BMRU and LRU channels side by side: ``round(bmru_fraction * n_state)`` BMRU channels (at least
    one of each kind) and the rest LRU channels (``n_state`` default D)."""

    def __init__(self, d_model: int, n_state: int | None = None, bmru_fraction: float = 0.5,
                 use_output_gate: bool = True, bmru_kwargs: dict | None = None,
                 lru_kwargs: dict | None = None) -> None:
        n = n_state or d_model
        if n < 2:
            raise ValueError(f"a hybrid MRU mixer needs n_state >= 2, got {n}")
        if not 0 < bmru_fraction < 1:
            raise ValueError(f"bmru_fraction must be in (0, 1), got {bmru_fraction!r}")
        n_b = min(max(round(bmru_fraction * n), 1), n - 1)
        super().__init__(d_model, n_b, n - n_b, use_output_gate, bmru_kwargs, lru_kwargs)
