r"""Deep neural memories as :class:`~growmem.memories.base.Memory` adapters: DLA and Titans.

Per head the memory is the residual MLP M(x) = x + N(W1 GELU(W2 x)) (W2 ``[E, K]``, W1 ``[V, E]``,
E = ``expansion * K``, N = optional LayerNorm), trained at test time by (mini-batch) gradient descent
on an inner loss; the initial weights are learned parameters. See :mod:`growmem.ops.deep` for the
update rules, the chunk (mini-batch) semantics and the closed forms.

==========  ==========================================================  =============================
name        rule (G_t = grad l(M_c; k_t, v_t), M_c: chunk-start weights)  gates (per token and head)
==========  ==========================================================  =============================
dla         M_t = M_{t-1} - eta_t G_t,   l = -<M(k), v> (or mse)          eta = max_lr sigmoid(.)
titans      S_t = beta_t S_{t-1} - eta_t G_t,  M_t = alpha_t M_{t-1} + S_t,  eta as dla; alpha, beta =
            l = ||M(k) - v||^2  (Behrouz et al. 2024, Titans)               sigmoid(. + learned bias)
==========  ==========================================================  =============================

Outputs o_t = M_t(q_t) (q, k L2-normalized by the layer, no extra scale). States are
:class:`~growmem.ops.deep.DeepState`; the *readable* state is the weight pair ``(W1 [B, H, V, E],
W2 [B, H, E, K])`` (Titans' momentum is not part of it). The readout is not linear in the weights,
so Memory Caching's Residual reads each cached weight set and Memory Soup uses :meth:`soup_read`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from growmem.memories.base import Gates, Memory
from growmem.ops.deep import (
    LOSSES,
    DeepContext,
    DeepState,
    chunk_deep_memory,
    read_deep_memory,
    soup_read_deep_memory,
    step_deep_memory,
)

__all__ = ["DeepMemory", "DLAMemory", "TitansMemory"]


class DeepMemory(Memory):
    """Base of the deep memories (the MLP, its learned initial weights, the ops plumbing).

    Args:
        num_heads, head_k_dim, head_v_dim: H, K, V (K == V is required by the residual).
        chunk_size: b, the mini-batch of the inner gradient descent (also the decode semantics:
            a token-by-token stream takes its gradients at the same chunk-start weights).
        expansion: E = expansion * K hidden units.
        loss: inner loss, ``dot`` (-<M(k), v>) or ``mse`` (||M(k) - v||^2).
        layer_norm: M(x) = x + LayerNorm(W1 act(W2 x)) (no affine) instead of x + W1 act(W2 x).
        max_lr: eta_t = max_lr * sigmoid(raw eta) (default: DLA 0.1, Titans 0.01). The gradients of a
            chunk add up at the chunk-start weights and momentum amplifies them by ~1 / (1 - beta), so
            the inner GD is stable for roughly max_lr * chunk_size / (1 - beta) < 1 (curvature ~ 1 at
            init): Titans with max_lr 0.03, b = 64 diverges on random unit keys, 0.01 does not.
        norm_eps: LayerNorm epsilon.
    """

    linear_readout = False
    l2_normalize_qk = True
    momentum = False
    retention = False
    default_loss = "mse"
    default_max_lr = 0.1

    def __init__(self, num_heads: int, head_k_dim: int, head_v_dim: int, chunk_size: int = 64,
                 expansion: int = 4, loss: str | None = None, layer_norm: bool = False, max_lr: float | None = None,
                 norm_eps: float = 1e-6) -> None:
        super().__init__(num_heads, head_k_dim, head_v_dim, chunk_size)
        if head_k_dim != head_v_dim:
            raise ValueError(f"{type(self).__name__} needs head_k_dim == head_v_dim for its residual "
                             f"M(x) = x + MLP(x), got K={head_k_dim}, V={head_v_dim} (use expand_v=1)")
        loss = self.default_loss if loss is None else loss
        max_lr = self.default_max_lr if max_lr is None else max_lr
        if loss not in LOSSES:
            raise ValueError(f"unknown inner loss {loss!r}; choose from {', '.join(LOSSES)}")
        if not isinstance(expansion, int) or isinstance(expansion, bool) or expansion < 1:
            raise ValueError(f"expansion must be a positive int, got {expansion!r}")
        if not max_lr > 0 or not norm_eps > 0:
            raise ValueError(f"max_lr and norm_eps must be > 0, got {max_lr}, {norm_eps}")
        H, K = num_heads, head_k_dim
        E = expansion * K
        self.hidden_dim, self.loss, self.layer_norm = E, loss, layer_norm
        self.max_lr, self.norm_eps = float(max_lr), float(norm_eps)
        # learned initial weights. Keys are unit vectors; W2 ~ N(0, 1/K) makes ||act(W2 k)|| ~ 1 (E = 4K), so
        # the inner loss has O(1) curvature and the inner GD is stable for eta up to ~1 (W2 ~ N(0, 1) gives
        # ||act|| ~ sqrt(E) and made Titans diverge at eta ~ 0.05 on random data).
        self.w2_init = nn.Parameter(torch.randn(H, E, K) * K ** -0.5)
        self.w1_init = nn.Parameter(torch.randn(H, K, E) * E ** -0.5)

    # -- gates -------------------------------------------------------------------------------------
    def make_gates(self, raw: Gates) -> Gates:
        return {"eta": self.max_lr * torch.sigmoid(raw["eta"][..., 0])}

    def _rule(self, gates: Gates) -> dict[str, Any]:
        return dict(eta=gates["eta"], log_alpha=gates.get("log_alpha"), log_beta=gates.get("log_beta"),
                    chunk_size=self.chunk_size, loss=self.loss, layer_norm=self.layer_norm, eps=self.norm_eps)

    # -- states ------------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The MLP reads q itself (q, k are unit vectors); no query scale."""
        return 1.0

    def initial_state(self, batch_size: int, ref: torch.Tensor) -> DeepState:
        """The learned initial weights (zero momentum) for a batch, in ``ref``'s dtype and device."""
        B = batch_size
        w1 = self.w1_init.to(ref.dtype)[None].expand(B, *self.w1_init.shape)
        w2 = self.w2_init.to(ref.dtype)[None].expand(B, *self.w2_init.shape)
        s1, s2 = self._zero_momentum(w1, w2)
        return DeepState(w1, w2, s1, s2, w1, w2, torch.zeros(B, dtype=torch.long, device=ref.device))

    def _zero_momentum(self, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # without momentum the slots hold empty [B, H, 0] tensors (not None: MC's pytree maps need tensor leaves)
        if self.momentum:
            return torch.zeros_like(w1), torch.zeros_like(w2)
        e = w1.new_zeros(*w1.shape[:2], 0)
        return e, e

    def _state(self, state: Any, ref: torch.Tensor) -> DeepState:
        if state is None:
            return self.initial_state(ref.shape[0], ref)
        if isinstance(state, DeepState):
            return state
        if isinstance(state, (tuple, list)) and len(state) == 2:  # readable weights: start a chunk there
            w1, w2 = state
            phase = torch.zeros(w1.shape[0], dtype=torch.long, device=w1.device)
            return DeepState(w1, w2, *self._zero_momentum(w1, w2), w1, w2, phase)
        raise TypeError(f"state of {type(self).__name__} must be a DeepState or a (W1, W2) pair, "
                        f"got {type(state).__name__}")

    def readable(self, state: DeepState) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights a query reads: ``(W1 [B, H, V, E], W2 [B, H, E, K])``."""
        return state.w1, state.w2

    def state_size(self) -> int:
        return self.num_heads * self.hidden_dim * (self.head_k_dim + self.head_v_dim)

    # -- passes --------------------------------------------------------------------------------------
    def forward(self, q, k, v, gates, initial_state=None, output_final_state=False, return_chunk_states=False):
        return chunk_deep_memory(q, k, v, state=self._state(initial_state, q), output_final_state=output_final_state,
                                 return_chunk_states=return_chunk_states, **self._rule(gates))

    def forward_with_context(self, q, k, v, gates, initial_state=None):
        """The chunked pass returning ``(o, final_state, context)``; the :class:`DeepContext` lets
        :meth:`soup_read` apply every token's online weights without materializing them."""
        o, final, ctx = chunk_deep_memory(q, k, v, state=self._state(initial_state, q), output_final_state=True,
                                          return_context=True, **self._rule(gates))
        return o, final, ctx

    def step(self, q, k, v, gates, state):
        return step_deep_memory(q, k, v, state=self._state(state, q), **self._rule(gates))

    def read(self, states, q):
        """Weight sets ``(W1 [B, N, H, V, E], W2 [B, N, H, E, K])`` x q ``[B, T, H, K]`` -> ``[B, T, N, H, V]``."""
        return read_deep_memory(states, q, self.layer_norm, self.norm_eps)

    def soup_read(self, q: torch.Tensor, o_online: torch.Tensor, g_online: torch.Tensor, cached: Any,
                  g_cached: torch.Tensor, online: DeepContext | None = None) -> torch.Tensor:
        """Memory Soup: the memory with weights g_on W_t + sum_i g_i W_i applied to q_t (MC paper Eqs.
        14-15), without a mixed weight set per token (see :func:`~growmem.ops.deep.soup_read_deep_memory`).

        q ``[B, T, H, K]``; o_online (unused: the soup re-reads the mixed weights) ``[B, T, H, V]``;
        g_online ``[B, T, H, 1]``; cached weights stacked on dim 1; g_cached ``[B, T, H, n]``; ``online``:
        the context of the call that produced these T tokens (:meth:`forward_with_context`)."""
        if online is None:
            raise ValueError(f"{type(self).__name__}.soup_read needs the online context of the pass "
                             "(forward_with_context), since the online weights differ per token")
        return soup_read_deep_memory(q, g_online, cached, g_cached, online, self.layer_norm, self.norm_eps)


class DLAMemory(DeepMemory):
    """Deep linear attention: M_t = M_{t-1} - eta_t grad l(M_c; k_t, v_t), l = -<M(k_t), v_t> by default
    (``loss="mse"``: ||M(k_t) - v_t||^2). With a linear M it would be linear attention S += eta v k^T."""

    name = "dla"
    gate_features = {"eta": 1}
    default_loss = "dot"


class TitansMemory(DeepMemory):
    """Titans' long-term memory module (Behrouz et al. 2024): S_t = beta_t S_{t-1} - eta_t grad l(M_c; k_t, v_t),
    M_t = alpha_t M_{t-1} + S_t, l = ||M(k_t) - v_t||^2, with eta = max_lr sigmoid(.), alpha (retention) and
    beta (momentum) = sigmoid(. + learned per-head bias) from per-token, per-head projections."""

    name = "titans"
    gate_features = {"eta": 1, "alpha": 1, "beta": 1}
    momentum = True
    retention = True
    default_max_lr = 0.01

    def __init__(self, num_heads: int, head_k_dim: int, head_v_dim: int, chunk_size: int = 64,
                 expansion: int = 4, loss: str | None = None, layer_norm: bool = False, max_lr: float | None = None,
                 norm_eps: float = 1e-6, alpha_bias: float = 6.0, beta_bias: float = 2.0) -> None:
        super().__init__(num_heads, head_k_dim, head_v_dim, chunk_size, expansion, loss, layer_norm, max_lr,
                         norm_eps)
        self.alpha_bias = nn.Parameter(torch.full((num_heads,), float(alpha_bias)))  # sigmoid(6) ~ 0.9975
        self.beta_bias = nn.Parameter(torch.full((num_heads,), float(beta_bias)))  # sigmoid(2) ~ 0.88

    def make_gates(self, raw: Gates) -> Gates:
        return {"eta": self.max_lr * torch.sigmoid(raw["eta"][..., 0]),
                "log_alpha": F.logsigmoid(raw["alpha"][..., 0] + self.alpha_bias.to(raw["alpha"].dtype)),
                "log_beta": F.logsigmoid(raw["beta"][..., 0] + self.beta_bias.to(raw["beta"].dtype))}
