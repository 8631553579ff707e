r"""Deep (MLP) memories trained at test time -- DLA and Titans -- in a chunked parallel form.

Per batch element and head the memory is a residual two-layer MLP (expansion E = 4K by default)::

    M(x) = x + N(W1 act(W2 x)),    W2: [E, K],  W1: [V, E]  (K == V: residual),  act = GELU,
                                   N = LayerNorm without affine (``layer_norm=True``) or the identity

and every token t takes a gradient step on an inner loss l(M; k_t, v_t) (Behrouz et al. 2024,
"Titans: Learning to Memorize at Test Time"; the MC paper's Eqs. 30-36 apply Memory Caching to them)::

    loss="dot":  l = -<M(k_t), v_t>            (DLA, deep linear attention: linear M gives S += eta v k^T)
    loss="mse":  l = ||M(k_t) - v_t||^2         (Titans' associative-memory loss; a DLA option)

    no momentum (DLA):  M_t = alpha_t M_{t-1} - eta_t G_t                            (alpha = 1: plain GD)
    momentum (Titans):  S_t = beta_t S_{t-1} - eta_t G_t,   M_t = alpha_t M_{t-1} + S_t

M stands for the pair (W1, W2); alpha (retention), beta (momentum) and eta (inner learning rate) are
per token and head, given as ``log_alpha, log_beta <= 0`` and ``eta >= 0`` ``[B, T, H]``. Output:
``o_t = M_t(q_t)``, the memory after token t's own update.

**Mini-batch semantics (chunk size b).** As in Titans (Sec. 3.2, "parallelizable training"),
positions are cut into chunks of b tokens on an absolute grid (counted from the fresh state); every
gradient of a chunk is taken at the *chunk-start* weights M_c (the weights after the previous
chunk), while momentum and retention still act per token::

    G_t = grad_M l(M_c; k_t, v_t)                          for every t in the chunk
    S_t = beta_t S_{t-1} - eta_t G_t,   M_t = alpha_t M_{t-1} + S_t,   o_t = M_t(q_t)

so M_t (token t's weights) is the chunk-start state advanced by the decayed, momentum-weighted
gradients of the chunk's tokens <= t, all taken at M_c. ``b = 1`` is exact online gradient descent.
The state keeps M_c and the number of tokens of the current chunk already seen (``phase``), so a
sequence fed in pieces, or token by token with :func:`step_deep_memory`, equals one pass.

**Closed form inside a chunk** (local tokens i, j = 1..b; A_i = prod_{l<=i} alpha_l,
B_i = prod_{l<=i} beta_l, computed as cumulative sums in log space, masks applied before ``exp``)::

    P^A_{im} = A_i / A_m,  P^B_{mj} = B_m / B_j   (m >= j, i >= m; else 0)
    M_i = A_i M_0 + c_i S_0 - sum_{j<=i} D_ij eta_j G_j,   D = P^A P^B,  c = P^A B
    S_i = B_i S_0 - sum_{j<=i} P^B_ij eta_j G_j
    (no momentum: D = P^A, c = 0.)

With the MLP's backward written by hand, the per-token gradients are outer products,
``G^{W1}_j = dY_j a_j^T`` and ``G^{W2}_j = dZ_j k_j^T`` (a_j = act(W2_c k_j), dY_j = dl/dY_j,
dZ_j = (W1_c^T dY_j) * act'(W2_c k_j)), so the reads never materialize a per-token weight set::

    W2_i q_i = A_i W2_0 q_i + c_i S2_0 q_i - sum_j D_ij eta_j <k_j, q_i> dZ_j        (a [b, b] @ [b, E] matmul)
    W1_i x_i = A_i W1_0 x_i + c_i S1_0 x_i - sum_j D_ij eta_j <a_j, x_i> dY_j

Everything that does not depend on the chunk-start weights (decay matrices, <k_j, q_i>) is computed
for all chunks at once; a short Python loop over chunks carries the weights (no per-token loop).
Outer gradients flow through these closed forms by autograd.

Functions: :func:`chunk_deep_memory` (the parallel form), :func:`naive_deep_memory` (per-token loop
with ``torch.autograd.grad``, the reference, same chunk semantics for any b), :func:`step_deep_memory`
(one token, hand-written gradients), :func:`read_deep_memory` (many weight sets, many queries) and
:func:`soup_read_deep_memory` (Memory Soup without a mixed weight set per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from growmem.ops.utils import check_chunk_size, check_finite, check_float, check_gate, check_qkv

__all__ = ["DeepState", "DeepContext", "LOSSES", "chunk_deep_memory", "naive_deep_memory", "step_deep_memory",
           "read_deep_memory", "soup_read_deep_memory"]

LOSSES = ("dot", "mse")


class DeepState(NamedTuple):
    """State of a deep memory (every leaf starts with ``[B, H]``).

    Attributes:
        w1: ``[B, H, V, E]`` current second-layer weights.
        w2: ``[B, H, E, K]`` current first-layer weights.
        s1, s2: momenta of w1, w2 (same shapes); ignored and passed through unchanged without momentum
            (``log_beta=None``), where the memories keep empty ``[B, H, 0]`` tensors there.
        w1_start, w2_start: the weights at the start of the current chunk, where the gradients of the
            chunk's tokens are taken (the same tensors as w1, w2 when ``phase == 0``).
        phase: ``[B]`` (long, equal entries) tokens of the current chunk already seen, ``0 .. b - 1``.
    """

    w1: Tensor
    w2: Tensor
    s1: Tensor | None
    s2: Tensor | None
    w1_start: Tensor
    w2_start: Tensor
    phase: Tensor


# ----------------------------------------------------------------------------------------------
# the MLP's pieces, written by hand (their outer gradients come from autograd)
# ----------------------------------------------------------------------------------------------

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_grad(z: Tensor) -> Tensor:
    """d/dz of the exact GELU z Phi(z): Phi(z) + z phi(z) (differentiable, for the outer gradient)."""
    return 0.5 * (1.0 + torch.erf(z * _INV_SQRT2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT2PI


def _ln(y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """LayerNorm over the last dim without affine: (normalized y, 1 / std)."""
    yc = y - y.mean(-1, keepdim=True)
    rstd = torch.rsqrt(yc.square().mean(-1, keepdim=True) + eps)
    return yc * rstd, rstd


def _ln_backward(yhat: Tensor, rstd: Tensor, g: Tensor) -> Tensor:
    """Gradient through :func:`_ln`: dl/dy from dl/dyhat = g."""
    return rstd * (g - g.mean(-1, keepdim=True) - yhat * (g * yhat).mean(-1, keepdim=True))


def _out_grad(out: Tensor, v: Tensor, loss: str) -> Tensor:
    """dl/dM(k) for the inner loss."""
    return -v if loss == "dot" else 2.0 * (out - v)


def _mlp_grads(x: Tensor, v: Tensor, w1: Tensor, w2: Tensor, loss: str, layer_norm: bool, eps: float):
    """Inner-loss gradient pieces for keys x ``[..., n, K]`` against weights w1 ``[..., V, E]``, w2
    ``[..., E, K]``: ``(a, dY, dZ)`` with ``grad W1 = sum dY a^T`` and ``grad W2 = sum dZ x^T``."""
    z = x @ w2.transpose(-1, -2)  # [..., n, E]
    a = F.gelu(z)
    y = a @ w1.transpose(-1, -2)  # [..., n, V]
    if layer_norm:
        yhat, rstd = _ln(y, eps)
        dy = _ln_backward(yhat, rstd, _out_grad(x + yhat, v, loss))
    else:
        dy = _out_grad(x + y, v, loss)
    dz = (dy @ w1) * _gelu_grad(z)  # [..., n, E]
    return a, dy, dz


def _finish(x: Tensor, y: Tensor, layer_norm: bool, eps: float) -> Tensor:
    """x + N(y): the residual and the optional LayerNorm of the MLP."""
    return x + (F.layer_norm(y, y.shape[-1:], eps=eps) if layer_norm else y)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

def _validate(q, k, v, eta, log_alpha, log_beta, state: DeepState, chunk_size: int, loss: str):
    B, T, H, K, V = check_qkv(q, k, v)
    if K != V:
        raise ValueError(f"a deep memory needs head_k_dim == head_v_dim (residual x + MLP(x)), got K={K}, V={V}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    check_chunk_size(chunk_size)
    for name, g in (("eta", eta), ("log_alpha", log_alpha), ("log_beta", log_beta)):
        if g is not None:
            check_gate(name, g, B, T, H, ref=q)
    if not isinstance(state, DeepState):
        raise TypeError(f"state must be a DeepState, got {type(state).__name__}")
    E = state.w2.shape[-2]
    want = {"w1": (B, H, V, E), "w2": (B, H, E, K), "w1_start": (B, H, V, E), "w2_start": (B, H, E, K)}
    if log_beta is not None:
        want |= {"s1": (B, H, V, E), "s2": (B, H, E, K)}
    for name, shape in want.items():
        x = getattr(state, name)
        if x is None:
            raise ValueError(f"state.{name} is missing (momentum needs s1, s2)")
        check_float(f"state.{name}", x)
        if tuple(x.shape) != shape:
            raise ValueError(f"state.{name} must have shape {shape}, got {tuple(x.shape)}")
        check_finite(f"state.{name}", x)
    if state.phase.shape != (B,):
        raise ValueError(f"state.phase must have shape [B] = ({B},), got {tuple(state.phase.shape)}")
    p = int(state.phase[0])
    if not 0 <= p < chunk_size:
        raise ValueError(f"state.phase = {p} is not in [0, chunk_size = {chunk_size})")
    return B, T, H, K, E, p


def _scalar(g: Tensor | None, t: int | None = None) -> Tensor | None:
    """A per-token gate [B, T, H] (or [B, H]) at token t, shaped [B, H, 1, 1] for the weights."""
    if g is None:
        return None
    x = g if t is None else g[:, t]
    return x[..., None, None]


# ----------------------------------------------------------------------------------------------
# reference (per-token loop, autograd gradients) and decoding step (hand gradients)
# ----------------------------------------------------------------------------------------------

def _mlp_ref(w1: Tensor, w2: Tensor, x: Tensor, layer_norm: bool, eps: float) -> Tensor:
    """M(x) for x [B, H, K] with weight sets [B, H, V, E], [B, H, E, K] (plain torch ops)."""
    y = torch.einsum("bhve,bhe->bhv", w1, F.gelu(torch.einsum("bhek,bhk->bhe", w2, x)))
    return x + (F.layer_norm(y, y.shape[-1:], eps=eps) if layer_norm else y)


def _autograd_grads(w1, w2, k, v, loss, layer_norm, eps):
    with torch.enable_grad():
        x1 = w1 if w1.requires_grad else w1.detach().requires_grad_(True)
        x2 = w2 if w2.requires_grad else w2.detach().requires_grad_(True)
        out = _mlp_ref(x1, x2, k, layer_norm, eps)
        val = -(out * v).sum() if loss == "dot" else (out - v).square().sum()
        return torch.autograd.grad(val, (x1, x2), create_graph=True)


def _update(w1, w2, s1, s2, g1, g2, eta, la, lb):
    """One token's update from its gradients (eta, la, lb shaped [B, H, 1, 1] or None)."""
    if lb is not None:
        beta = lb.exp()
        s1, s2 = beta * s1 - eta * g1, beta * s2 - eta * g2
        u1, u2 = s1, s2
    else:
        u1, u2 = -eta * g1, -eta * g2
    if la is not None:
        alpha = la.exp()
        w1, w2 = alpha * w1, alpha * w2
    return w1 + u1, w2 + u2, s1, s2


def naive_deep_memory(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, log_alpha: Tensor | None,
                      log_beta: Tensor | None, state: DeepState, chunk_size: int = 1, loss: str = "mse",
                      layer_norm: bool = False, eps: float = 1e-6) -> tuple[Tensor, DeepState]:
    """Reference: a loop over tokens with materialized weights and ``torch.autograd.grad`` gradients
    (taken at the chunk-start weights of the absolute chunk grid; ``chunk_size=1`` is exact online
    gradient descent). q, k, v ``[B, T, H, K]``; gates ``[B, T, H]``. Returns ``(o [B, T, H, V], state)``."""
    B, T, H, K, E, p = _validate(q, k, v, eta, log_alpha, log_beta, state, chunk_size, loss)
    w1, w2, s1, s2 = state.w1, state.w2, state.s1, state.s2
    a1, a2 = (state.w1_start, state.w2_start) if p else (w1, w2)
    outs = []
    for t in range(T):
        if p == 0:
            a1, a2 = w1, w2
        g1, g2 = _autograd_grads(a1, a2, k[:, t], v[:, t], loss, layer_norm, eps)
        w1, w2, s1, s2 = _update(w1, w2, s1, s2, g1, g2, _scalar(eta, t), _scalar(log_alpha, t),
                                 _scalar(log_beta, t))
        outs.append(_mlp_ref(w1, w2, q[:, t], layer_norm, eps))
        p = (p + 1) % chunk_size
    final = DeepState(w1, w2, s1, s2, a1 if p else w1, a2 if p else w2,
                      torch.full((B,), p, dtype=torch.long, device=q.device))
    return torch.stack(outs, 1), final


def step_deep_memory(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, log_alpha: Tensor | None,
                     log_beta: Tensor | None, state: DeepState, chunk_size: int = 1, loss: str = "mse",
                     layer_norm: bool = False, eps: float = 1e-6) -> tuple[Tensor, DeepState]:
    """One token (decoding): q, k, v ``[B, H, K]``, gates ``[B, H]`` -> ``(o [B, H, V], state)``.

    The gradient is taken at the chunk-start weights kept in the state, so a loop of steps equals
    :func:`chunk_deep_memory` with the same ``chunk_size``; ``chunk_size=1`` is exact online GD."""
    one = lambda x: None if x is None else x[:, None]  # noqa: E731
    B, _, H, K, E, p = _validate(q[:, None], k[:, None], v[:, None], one(eta), one(log_alpha), one(log_beta),
                                 state, chunk_size, loss)
    a1, a2 = (state.w1_start, state.w2_start) if p else (state.w1, state.w2)
    a, dy, dz = _mlp_grads(k[..., None, :], v[..., None, :], a1, a2, loss, layer_norm, eps)  # [B, H, 1, .]
    g1, g2 = dy.transpose(-1, -2) @ a, dz.transpose(-1, -2) @ k[..., None, :]
    w1, w2, s1, s2 = _update(state.w1, state.w2, state.s1, state.s2, g1, g2, _scalar(eta), _scalar(log_alpha),
                             _scalar(log_beta))
    y = (F.gelu(q[..., None, :] @ w2.transpose(-1, -2)) @ w1.transpose(-1, -2))[..., 0, :]
    o = _finish(q, y, layer_norm, eps)
    p = (p + 1) % chunk_size
    phase = torch.full((B,), p, dtype=torch.long, device=q.device)
    return o, DeepState(w1, w2, s1, s2, a1 if p else w1, a2 if p else w2, phase)


# ----------------------------------------------------------------------------------------------
# chunked parallel form
# ----------------------------------------------------------------------------------------------

@dataclass
class DeepContext:
    """What Memory Soup needs to apply every token's online weights of one chunked call without
    materializing them (all leaves ``[B, H, NC, ...]`` in the padded chunk layout; ``front`` padding
    tokens precede the call's ``length`` tokens).

    ``h``: the online first-layer products W2_t q_t ``[B, H, NC, b, E]``; ``w1``, ``s1``: second-layer
    weights and momentum at the chunk starts ``[B, H, NC, V, E]``; ``decay`` (A_i) and ``mom`` (c_i)
    ``[B, H, NC, b]`` (``None`` when alpha = 1 / without momentum); ``coef`` D_ij eta_j
    ``[B, H, NC, b, b]``; ``a`` ``[B, H, NC, b, E]`` and ``dy`` ``[B, H, NC, b, V]``: the gradient factors.
    """

    front: int
    length: int
    h: Tensor
    w1: Tensor
    s1: Tensor | None
    decay: Tensor | None
    mom: Tensor | None
    coef: Tensor
    a: Tensor
    dy: Tensor

    def _tokens(self, x: Tensor) -> Tensor:
        """[B, H, NC, b, D] -> the call's tokens [B, H, T, D]."""
        B, H, NC, b, D = x.shape
        return x.reshape(B, H, NC * b, D)[:, :, self.front: self.front + self.length]

    def online_h(self) -> Tensor:
        """W2_t q_t for every token: ``[B, H, T, E]``."""
        return self._tokens(self.h)

    def apply_w1(self, x: Tensor) -> Tensor:
        """W1_t x_t for every token t (the online second layer after token t's update): x ``[B, H, T, E]``
        -> ``[B, H, T, V]``, in closed form per chunk (no per-token weights)."""
        B, H, NC, b, E = self.a.shape
        xc = F.pad(x, (0, 0, self.front, NC * b - self.front - self.length)).reshape(B, H, NC, b, E)
        z = xc @ self.w1.transpose(-1, -2)
        if self.decay is not None:
            z = self.decay[..., None] * z
        if self.s1 is not None:
            z = z + self.mom[..., None] * (xc @ self.s1.transpose(-1, -2))
        z = z - (self.coef * (xc @ self.a.transpose(-1, -2))) @ self.dy
        return self._tokens(z)


def _decay_matrix(lg: Tensor, tril: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Log gates [..., b] -> (cumulative log gates [..., b], P [..., b, b] with P_ij = exp(c_i - c_j), i >= j)."""
    c = lg.to(torch.promote_types(lg.dtype, torch.float32)).cumsum(-1)
    diff = (c[..., :, None] - c[..., None, :]).masked_fill(~tril, float("-inf"))
    return c, diff.exp().to(dtype)


def chunk_deep_memory(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, log_alpha: Tensor | None,
                      log_beta: Tensor | None, state: DeepState, chunk_size: int = 64, loss: str = "mse",
                      layer_norm: bool = False, eps: float = 1e-6, output_final_state: bool = False,
                      return_chunk_states: bool = False, return_context: bool = False) -> tuple:
    """The chunked parallel form (see the module docstring for the semantics and the closed form).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (V == K).
        eta: ``[B, T, H]`` inner learning rates (>= 0); log_alpha: ``[B, T, H]`` log retention or None
            (alpha = 1); log_beta: ``[B, T, H]`` log momentum or None (no momentum).
        state: :class:`DeepState` to start from (its ``phase`` places the call on the chunk grid).
        chunk_size: b, the mini-batch of the inner gradient descent.
        loss: ``dot`` or ``mse``; layer_norm, eps: the MLP's optional output LayerNorm.
        return_chunk_states: also return the readable weights ``(W1 [B, NC, H, V, E], W2 [B, NC, H, E, K])``
            after the call's tokens ``b, 2b, ...`` and the last one (NC = ceil(T / b)).
        return_context: also return the :class:`DeepContext` of the call (for Memory Soup).

    Returns ``(o [B, T, H, V], final_state | None[, chunk_states][, context])``.
    """
    B, T, H, K, E, p = _validate(q, k, v, eta, log_alpha, log_beta, state, chunk_size, loss)
    b, dtype, dev = chunk_size, q.dtype, q.device
    momentum = log_beta is not None
    NC = -(-(p + T) // b)
    back = NC * b - p - T

    def lay(x: Tensor) -> Tensor:  # [B, T, H, D] -> [B, H, NC, b, D], p tokens of padding in front
        return F.pad(x.transpose(1, 2), (0, 0, p, back)).reshape(B, H, NC, b, x.shape[-1])

    def lay_g(g: Tensor) -> Tensor:  # [B, T, H] -> [B, H, NC, b]; padding: eta = 0, log-gates = 0
        return F.pad(g.transpose(1, 2), (p, back)).reshape(B, H, NC, b)

    tril = torch.ones(b, b, dtype=torch.bool, device=dev).tril()
    eta_c = lay_g(eta).to(dtype)
    if log_alpha is None:
        decay, P_A = None, tril.to(dtype)
    else:
        cA, P_A = _decay_matrix(lay_g(log_alpha), tril, dtype)
        decay = cA.exp().to(dtype)  # A_i
    if momentum:
        cB, P_B = _decay_matrix(lay_g(log_beta), tril, dtype)
        Bcum = cB.exp().to(dtype)  # B_i
        real = torch.ones(NC * b, dtype=dtype, device=dev)
        real[:p] = 0  # the front padding must not feed the momentum term c
        mom = (P_A @ (Bcum * real.view(NC, b))[..., None])[..., 0]  # c_i
        D = P_A @ P_B
        coef_s = P_B * eta_c[..., None, :]
    else:
        D, mom = P_A, None
    coef = D * eta_c[..., None, :]  # D_ij eta_j  [B, H, NC, b, b]
    Q, Kc, Vc = lay(q), lay(k), lay(v)
    coef_qk = coef * (Q @ Kc.transpose(-1, -2))

    # which rows of each chunk we need weights at: the carry (last real token) and the chunk states
    last = p + T - 1  # padded index of the last real token
    want: dict[int, list[int]] = {c: [b - 1 if c < NC - 1 else last - c * b] for c in range(NC)}
    cs_index: list[tuple[int, int]] = []
    if return_chunk_states:
        for t in [*range(b, T, b), T]:
            c, r = divmod(p + t - 1, b)
            if r not in want[c]:
                want[c].append(r)
            cs_index.append((c, want[c].index(r)))

    def unb(x):
        return [None] * NC if x is None else x.unbind(2)

    w1, w2, s1, s2 = state.w1, state.w2, state.s1, state.s2
    a1, a2 = (state.w1_start, state.w2_start) if p else (w1, w2)
    outs, hs, starts1, starts_s1, As, dYs, rows = [], [], [], [], [], [], []
    for c, (Qc, Kj, Vj, cf, cqk, dc, mc, ef, bc) in enumerate(zip(
            Q.unbind(2), Kc.unbind(2), Vc.unbind(2), coef.unbind(2), coef_qk.unbind(2), unb(decay), unb(mom),
            unb(coef_s if momentum else None), unb(Bcum if momentum else None), strict=True)):
        if c > 0:
            a1, a2 = w1, w2
        A, dY, dZ = _mlp_grads(Kj, Vj, a1, a2, loss, layer_norm, eps)  # gradients at the chunk-start weights
        # first layer of every token's weights: W2_i q_i
        h = Qc @ w2.transpose(-1, -2)
        if dc is not None:
            h = dc[..., None] * h
        if momentum:
            h = h + mc[..., None] * (Qc @ s2.transpose(-1, -2))
        h = h - cqk @ dZ
        aq = F.gelu(h)
        # second layer: W1_i act(W2_i q_i)
        y = aq @ w1.transpose(-1, -2)
        if dc is not None:
            y = dc[..., None] * y
        if momentum:
            y = y + mc[..., None] * (aq @ s1.transpose(-1, -2))
        y = y - (cf * (aq @ A.transpose(-1, -2))) @ dY
        outs.append(_finish(Qc, y, layer_norm, eps))
        if return_context:
            hs.append(h)
            starts1.append(w1)
            starts_s1.append(s1)
            As.append(A)
            dYs.append(dY)
        # weights at the wanted rows R: M_R = A_R M_0 + c_R S_0 - sum_j D_Rj eta_j G_j
        R = want[c]
        cr = cf[..., R, :]  # [B, H, r, b]
        n1 = w1[:, :, None] if dc is None else dc[..., R, None, None] * w1[:, :, None]
        n2 = w2[:, :, None] if dc is None else dc[..., R, None, None] * w2[:, :, None]
        if momentum:
            n1 = n1 + mc[..., R, None, None] * s1[:, :, None]
            n2 = n2 + mc[..., R, None, None] * s2[:, :, None]
        n1 = n1 - torch.einsum("bhrj,bhjv,bhje->bhrve", cr, dY, A)
        n2 = n2 - torch.einsum("bhrj,bhje,bhjk->bhrek", cr, dZ, Kj)
        if return_chunk_states:
            rows.append((n1, n2))
        if momentum:  # momentum at the carry row: S_e = B_e S_0 - sum_j P^B_ej eta_j G_j
            e = R[0]
            ce = ef[..., e, :]
            s1 = bc[..., e, None, None] * s1 - torch.einsum("bhj,bhjv,bhje->bhve", ce, dY, A)
            s2 = bc[..., e, None, None] * s2 - torch.einsum("bhj,bhje,bhjk->bhek", ce, dZ, Kj)
        w1, w2 = n1[:, :, 0], n2[:, :, 0]

    o = torch.stack(outs, 2).reshape(B, H, NC * b, -1)[:, :, p: p + T].transpose(1, 2)
    ret: list = [o]
    if output_final_state:
        ph = (p + T) % b
        ret.append(DeepState(w1, w2, s1, s2, a1 if ph else w1, a2 if ph else w2,
                             torch.full((B,), ph, dtype=torch.long, device=dev)))
    else:
        ret.append(None)
    if return_chunk_states:
        ret.append((torch.stack([rows[c][0][:, :, j] for c, j in cs_index], 1),
                    torch.stack([rows[c][1][:, :, j] for c, j in cs_index], 1)))
    if return_context:
        ret.append(DeepContext(front=p, length=T, h=torch.stack(hs, 2), w1=torch.stack(starts1, 2),
                               s1=torch.stack(starts_s1, 2) if momentum else None, decay=decay, mom=mom,
                               coef=coef, a=torch.stack(As, 2), dy=torch.stack(dYs, 2)))
    return tuple(ret)


# ----------------------------------------------------------------------------------------------
# reads
# ----------------------------------------------------------------------------------------------

def read_deep_memory(states: tuple[Tensor, Tensor], q: Tensor, layer_norm: bool = False,
                     eps: float = 1e-6) -> Tensor:
    """N weight sets ``(W1 [B, N, H, V, E], W2 [B, N, H, E, K])`` read by q ``[B, T, H, K]``:
    ``out[b, t, n] = M_n(q[b, t])`` -> ``[B, T, N, H, V]`` (batched matmuls over all N at once)."""
    w1, w2 = states
    qh = q.transpose(1, 2)[:, None]  # [B, 1, H, T, K]
    a = F.gelu(qh @ w2.transpose(-1, -2))  # [B, N, H, T, E]
    y = a @ w1.transpose(-1, -2)  # [B, N, H, T, V]
    return _finish(qh, y, layer_norm, eps).permute(0, 3, 1, 2, 4)


def _weighted_query(x: Tensor, g: Tensor, w: Tensor) -> Tensor:
    """sum_i g_i W_i x for x ``[B, H, T, D]``, g ``[B, H, T, n]``, weights w ``[B, n, H, O, D]`` -> ``[B, H, T, O]``,
    as one matmul per head: ``[g_1 x, ..., g_n x] @ [W_1^T; ...; W_n^T]`` (no mixed weights per token)."""
    B, H, T, D = x.shape
    n, O = w.shape[1], w.shape[-2]
    wx = (g[..., None] * x[..., None, :]).reshape(B, H, T, n * D)
    return wx @ w.permute(0, 2, 1, 4, 3).reshape(B, H, n * D, O)


def soup_read_deep_memory(q: Tensor, g_online: Tensor, cached: tuple[Tensor, Tensor], g_cached: Tensor,
                          online: DeepContext, layer_norm: bool = False, eps: float = 1e-6) -> Tensor:
    """Memory Soup (MC paper Eqs. 14-15) on deep memories: y_t = M_mix,t(q_t) with the mixed weights
    W_mix,t = g_on,t W_t + sum_i g_t,i W_i (W_t: the online weights after token t's update), i.e.

        h_t = g_on W2_t q_t + sum_i g_i W2_i q_t,    y_t = q_t + N(g_on W1_t act(h_t) + sum_i g_i W1_i act(h_t))

    computed from per-memory products: the cached ones in weighted-query form, the online ones from
    the call's :class:`DeepContext` (W2_t q_t as computed by the pass, W1_t x in closed form).

    q ``[B, T, H, K]``, g_online ``[B, T, H, 1]``, cached ``(W1 [B, n, H, V, E], W2 [B, n, H, E, K])``,
    g_cached ``[B, T, H, n]``; ``online`` must cover exactly these T tokens. Returns ``[B, T, H, V]``.
    """
    if q.shape[1] != online.length:
        raise ValueError(f"the online context covers {online.length} tokens, q has {q.shape[1]}")
    qh, gon, gc = q.transpose(1, 2), g_online.transpose(1, 2), g_cached.transpose(1, 2)
    h = gon * online.online_h() + _weighted_query(qh, gc, cached[1])
    x = F.gelu(h)
    z = gon * online.apply_w1(x) + _weighted_query(x, gc, cached[0])
    return _finish(qh, z, layer_norm, eps).transpose(1, 2)
