"""The optional fused CPU kernels (growmem.ops._native): they run where they apply, equal the eager path
and the per-token reference, do not depend on the thread count, and fall back cleanly (or fail loudly
when asked to) where they cannot be built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import growmem.ops.delta_rule as dr
import growmem.ops.gla as gla_mod
from growmem.ops import _native
from growmem.ops.gla import _factor_limit
from helpers import rel_err, require_native


def _inputs(B, T, H, K, V, dtype, gated=True, seed=0, decay=2.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=dtype) + decay) if gated else None
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=dtype))
    s0 = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    return q, k, v, g, beta, s0


def _spy(fn, calls: list):
    """``fn`` wrapped to append to ``calls`` whether each call ran the kernel (a result other than
    ``False`` / ``None``)."""

    def wrapped(*a, **kw):
        out = fn(*a, **kw)
        calls.append(out is not False and out is not None)
        return out

    return wrapped


def _count_forwards(monkeypatch, function_cls) -> list:
    """Patch an ``autograd.Function``'s forward to record its calls; returns the record."""
    ran: list = []
    real = function_cls.forward
    monkeypatch.setattr(function_cls, "forward", staticmethod(lambda ctx, *a: ran.append(1) or real(ctx, *a)))
    return ran


def _kernel(q, k, v, g, beta, s0, C, scale=0.3):
    B, T, H, K = q.shape
    V = v.shape[-1]
    NC = -(-T // C)
    states = q.new_empty(NC + 1, B * H, K, V)
    states[0] = s0.reshape(B * H, K, V)
    o = q.new_full((B, T, H, V), float("nan"))
    ran = _native.delta_rule_forward(q, k, v, g, beta, states, o, scale, C, _factor_limit(q.dtype))
    return ran, o, states


def _eager(monkeypatch, q, k, v, g, beta, s0, C, scale=0.3):
    with monkeypatch.context() as m:
        m.setenv("GROWMEM_NATIVE", "0")
        if g is None:
            return dr.chunk_delta_rule(q, k, v, beta, scale=scale, initial_state=s0, output_final_state=True,
                                       chunk_size=C, return_chunk_states=True)
        return dr.chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=s0, output_final_state=True,
                                         chunk_size=C, return_chunk_states=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("T,C", [(300, 64), (64, 64), (1, 64), (77, 16)])
def test_kernel_equals_eager_path(monkeypatch, dtype, gated, T, C):
    require_native()
    q, k, v, g, beta, s0 = _inputs(2, T, 3, 32, 48, dtype, gated, seed=T + C)
    ran, o, states = _kernel(q, k, v, g, beta, s0, C)
    assert ran
    o_ref, S_ref, cs_ref = _eager(monkeypatch, q, k, v, g, beta, s0, C)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(o, o_ref) < tol
    assert rel_err(states[1:].view(-1, 2, 3, 32, 48).transpose(0, 1), cs_ref) < tol
    assert rel_err(states[-1].view(2, 3, 32, 48), S_ref) < tol


def test_kernel_strong_decay_chunks_match_reference():
    """Chunks that decay beyond the factoring limit form the decay matrix (exponents <= 0); mixed with
    factored chunks in one sequence, the result still equals the per-token loop."""
    require_native()
    q, k, v, g, beta, s0 = _inputs(1, 90, 2, 8, 8, torch.float64, seed=3)
    g = g.clone()
    g[:, 16:32] = -20.0  # 16 x 20 = 320 > the float64 limit (~177)
    assert _factor_limit(torch.float64) < 16 * 20
    ran, o, states = _kernel(q, k, v, g, beta, s0, 16)
    assert ran
    o_ref, S_ref = dr.naive_gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=s0, output_final_state=True)
    assert rel_err(o, o_ref) < 1e-12
    assert rel_err(states[-1].view(1, 2, 8, 8), S_ref) < 1e-12


def test_kernel_result_does_not_depend_on_thread_count():
    require_native()
    q, k, v, g, beta, s0 = _inputs(1, 200, 5, 16, 16, torch.float32, seed=1)
    results = []
    prev = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            results.append(_kernel(q, k, v, g, beta, s0, 32))
    finally:
        torch.set_num_threads(prev)
    for ran, o, states in results:
        assert ran
        assert torch.equal(o, results[0][1]) and torch.equal(states, results[0][2])


def test_kernel_accepts_non_contiguous_inputs(monkeypatch):
    require_native()
    q, k, v, g, beta, s0 = _inputs(2, 50, 2, 8, 8, torch.float32, seed=5)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not qt.is_contiguous()
    ran, o, _ = _kernel(qt, k, v, g, beta, s0, 16)
    assert ran
    assert rel_err(o, _eager(monkeypatch, q, k, v, g, beta, s0, 16)[0]) < 1e-5


def test_chunk_op_runs_the_kernel_and_its_gradients_match_the_reference(monkeypatch):
    """The public op goes through the kernel for float32/float64 CPU inputs; the backward (eager,
    recomputing from the kernel's saved chunk states) gives the reference gradients."""
    require_native()
    calls = []
    monkeypatch.setattr(dr, "delta_rule_forward", _spy(_native.delta_rule_forward, calls))
    ins = [x.requires_grad_(True) for x in _inputs(1, 45, 2, 6, 5, torch.float64, seed=9)]
    q, k, v, g, beta, s0 = ins
    o, S = dr.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=8)
    assert calls == [True]
    o_ref, S_ref = dr.naive_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    w = torch.randn_like(o)
    grads = torch.autograd.grad((o * w).sum() + S.sum(), ins)
    grads_ref = torch.autograd.grad((o_ref * w).sum() + S_ref.sum(), ins)
    for a, b in zip(grads, grads_ref, strict=True):
        assert rel_err(a, b) < 1e-10


def test_kernel_declines_what_it_does_not_cover(monkeypatch):
    q, k, v, g, beta, s0 = _inputs(1, 10, 1, 4, 4, torch.float32)
    bf = [x.bfloat16() for x in (q, k, v, g, beta, s0)]
    ran, o, _ = _kernel(*bf, 4)
    assert not ran and torch.isnan(o).all()  # nothing written
    mixed = _kernel(q, k, v, g.double(), beta, s0, 4)
    assert not mixed[0]
    monkeypatch.setenv("GROWMEM_NATIVE", "0")
    assert not _native.native_enabled() and not _native.native_available()
    ran, o, _ = _kernel(q, k, v, g, beta, s0, 4)
    assert not ran and torch.isnan(o).all()


def test_failed_build_falls_back_with_a_warning_or_raises_when_required(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_error", None)
    monkeypatch.setenv("GROWMEM_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    q, k, v, g, beta, s0 = _inputs(1, 20, 2, 4, 4, torch.float32, seed=2)
    with pytest.warns(RuntimeWarning, match="eager path"):
        o, _ = dr.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, chunk_size=8)
    o_ref, _ = dr.naive_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    assert rel_err(o, o_ref) < 1e-5
    assert not _native.native_available() and "failed" in _native._error
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    monkeypatch.setattr(_native, "_error", None)
    monkeypatch.setenv("GROWMEM_NATIVE", "1")
    with pytest.raises(_native.NativeBuildError, match="failed"):
        dr.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=8)


def test_kernel_is_built_once_and_reused(monkeypatch, tmp_path):
    require_native()
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_error", None)
    monkeypatch.setenv("GROWMEM_KERNEL_CACHE", str(tmp_path))
    assert _native.native_available()
    (built,) = tmp_path.iterdir()
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(_native, "_lib", None)
    assert _native.native_available()
    assert [p.name for p in tmp_path.iterdir()] == [built.name] and built.stat().st_mtime_ns == stamp


def _grads(monkeypatch, native: bool, ins, gated: bool, C: int, weights):
    """Grads of a loss on o, the chunk states and the final state, with the fused kernels or eager."""
    q, k, v, g, beta, s0 = ins
    with monkeypatch.context() as m:
        if not native:
            m.setenv("GROWMEM_NATIVE", "0")
        if gated:
            o, S, cs = dr.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                                 chunk_size=C, return_chunk_states=True)
        else:
            o, S, cs = dr.chunk_delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True, chunk_size=C,
                                           return_chunk_states=True)
        wo, wc, wS = weights
        loss = (o * wo).sum() + (cs * wc[:, : cs.shape[1]]).sum() + (S * wS).sum()
        used = [x for x in ins if x is not None]
        return torch.autograd.grad(loss, used)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("T,C,decay", [(150, 64, 2.0), (33, 16, 2.0), (1, 64, 2.0), (70, 16, -12.0)])
def test_backward_kernel_as_accurate_as_eager_backward(monkeypatch, dtype, gated, T, C, decay):
    """Grads of every input (q, k, v, g, beta, initial state) through the fused backward, for a loss on
    the outputs, the returned chunk states and the final state, against the eager backward in float64
    on the same values: the fused kernel's error is within a factor 2 of the eager path's in the same
    dtype (or below 1e-5 relative in float32, 1e-10 in float64). decay = -12 makes every chunk of 16
    decay past the factoring limit (the masked-decay branch of both kernels); there the float32 grad of
    g is ~1% off in both paths (cancellation in its row-minus-column sums), hence a bound relative to
    eager."""
    require_native()
    ins64 = list(_inputs(2, T, 3, 16, 24, torch.float64, gated, seed=T, decay=decay))
    if gated and decay < 0:
        assert (-ins64[3][:, :C].sum(1)).min() > _factor_limit(torch.float64)
    gen = torch.Generator().manual_seed(1)
    NC = -(-T // C)
    w64 = (torch.randn(2, T, 3, 24, generator=gen, dtype=torch.float64),
           torch.randn(2, NC, 3, 16, 24, generator=gen, dtype=torch.float64),
           torch.randn(2, 3, 16, 24, generator=gen, dtype=torch.float64))

    def leaves(dt):
        return [None if x is None else x.to(dt).requires_grad_(True) for x in ins64]

    ref = _grads(monkeypatch, False, leaves(torch.float64), gated, C, w64)
    calls = []
    monkeypatch.setattr(dr, "delta_rule_backward", _spy(_native.delta_rule_backward, calls))
    w = tuple(x.to(dtype) for x in w64)
    fused = _grads(monkeypatch, True, leaves(dtype), gated, C, w)
    assert calls == [True]
    eager = _grads(monkeypatch, False, leaves(dtype), gated, C, w)
    for a, b, r in zip(fused, eager, ref, strict=True):
        err_fused, err_eager = rel_err(a.double(), r), rel_err(b.double(), r)
        floor = 1e-5 if dtype == torch.float32 else 1e-10
        assert err_fused <= max(2 * err_eager, floor), (err_fused, err_eager)


def test_backward_kernel_float64_gradcheck():
    """Finite differences on a tiny gated case, both kernels (forward and backward) in the loop."""
    require_native()
    ins = [x.requires_grad_(True) for x in _inputs(1, 11, 2, 3, 4, torch.float64, seed=6)]

    def f(q, k, v, g, beta, s0):
        o, S = dr.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=4)
        return o, S

    assert torch.autograd.gradcheck(f, ins)


def test_unwritable_cache_folder_falls_back_to_the_temporary_folder(monkeypatch, tmp_path):
    require_native()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_error", None)
    monkeypatch.setenv("GROWMEM_KERNEL_CACHE", str(blocker / "kernels"))  # mkdir fails under a file
    assert _native.native_available()
    assert Path(_native._lib._name).parent.name.startswith("growmem-kernels-")


# -- Sparse Selective Caching's reads -------------------------------------------------------------


def _selection(B, T, H, N, k, gen):
    """Random distinct picks per token among the memories cached before it (segments of T // N
    tokens; -1 where fewer than k exist), as SSC's top-k produces them."""
    seg = torch.arange(T) // max(1, T // N)
    sel = torch.full((B, T, H, k), -1, dtype=torch.int64)
    for t in range(T):
        n = int(min(seg[t], N))
        for b in range(B):
            for h in range(H):
                picks = torch.randperm(n, generator=gen)[:k] if n else torch.empty(0, dtype=torch.int64)
                sel[b, t, h, : len(picks)] = picks
    return sel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,T,H,N,K,V,k", [(2, 40, 3, 5, 8, 6, 2), (1, 64, 2, 8, 16, 16, 3), (1, 7, 1, 3, 4, 4, 4)])
def test_selected_read_kernel_equals_grouped_eager_read(dtype, B, T, H, N, K, V, k):
    """The fused SSC read and its grads (cached states, queries, weights) equal the grouped eager
    read (_SelectedRead over _ssc_groups) on the same selections, unused slots (-1) included."""
    require_native()
    from growmem.caching.wrapper import _FusedSelectedRead, _SelectedRead, _ssc_groups

    gen = torch.Generator().manual_seed(T + N)
    cached = torch.randn(B, N, H, K, V, generator=gen, dtype=dtype, requires_grad=True)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype, requires_grad=True)
    sel = _selection(B, T, H, N, k, gen)
    w = (torch.rand(B, T, H, k, generator=gen, dtype=dtype) * (sel >= 0)).requires_grad_(True)
    dr = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    fused = _FusedSelectedRead.apply(cached, q, w, sel, 0.7)
    eager = _SelectedRead.apply(cached, q, w, _ssc_groups(sel, N), 0.7)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(fused, eager) < tol
    for a, b in zip(torch.autograd.grad((fused * dr).sum(), (cached, q, w)),
                    torch.autograd.grad((eager * dr).sum(), (cached, q, w)), strict=True):
        assert rel_err(a, b) < tol


def test_selected_read_kernel_gradcheck():
    require_native()
    from growmem.caching.wrapper import _FusedSelectedRead

    gen = torch.Generator().manual_seed(0)
    cached = torch.randn(1, 3, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 9, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    sel = _selection(1, 9, 2, 3, 2, gen)
    w = torch.rand(1, 9, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, q, w: _FusedSelectedRead.apply(c, q, w, sel, 0.5), (cached, q, w))


@pytest.mark.parametrize("base", ["la", "gdn"])
def test_ssc_layer_uses_the_kernel_and_equals_the_eager_path(monkeypatch, base):
    """A whole SSC memory (selection, online memory, gated sum): output and every input grad are the
    same with the fused kernels as with GROWMEM_NATIVE=0, and the fused read is what ran."""
    require_native()
    import growmem.caching.wrapper as wr
    from growmem.caching import CachedMemory, MCConfig
    from growmem.memories import GatedDeltaNetMemory, LinearAttentionMemory

    cls = {"la": LinearAttentionMemory, "gdn": GatedDeltaNetMemory}[base]
    mem = CachedMemory(cls(2, 8, 8, 8), "ssc", MCConfig(segment_size=16, top_k=2)).double()
    gen = torch.Generator().manual_seed(4)
    T = 70
    q, k, v, u = (torch.randn(1, T, 2, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    if mem.l2_normalize_qk:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    raw = {n: torch.randn(1, T, 2, f, generator=gen, dtype=torch.float64) for n, f in mem.gate_features.items()}
    leaves = [x.requires_grad_(True) for x in (q, k, v, u, *raw.values())]
    ran = _count_forwards(monkeypatch, wr._FusedSelectedRead)

    def run():
        gates = mem.make_gates(dict(zip(raw, leaves[4:], strict=True)))
        gates["u"] = leaves[3]
        y = mem(*leaves[:3], gates, initial_state=mem.new_state(1, T))[0]
        return y, torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(), leaves)

    y, grads = run()
    assert ran
    monkeypatch.setenv("GROWMEM_NATIVE", "0")
    y0, grads0 = run()
    assert rel_err(y, y0) < 1e-12
    for a, b in zip(grads, grads0, strict=True):
        assert rel_err(a, b) < 1e-11


# -- GRM / Soup's gated reads -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes,counts", [([5, 8, 8, 3], [0, 1, 2, 3]), ([16], [3]), ([4, 4], [2, 4]), ([7], [0])])
def test_gated_read_kernel_equals_eager_gated_read(dtype, sizes, counts):
    """The fused GRM read and its grads (cached states, queries, weights) equal the eager _GatedRead
    over the flattened states, pieces that see no cached state (n_p = 0) included."""
    require_native()
    from growmem.caching.wrapper import _FusedGatedRead, _GatedRead

    B, H, N, K, V = 2, 3, 4, 8, 6
    T = sum(sizes)
    gen = torch.Generator().manual_seed(T)
    cached = torch.randn(B, N, H, K, V, generator=gen, dtype=dtype, requires_grad=True)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype, requires_grad=True)
    g = torch.rand(B, T, H, N, generator=gen, dtype=dtype, requires_grad=True)
    dr = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    fused = _FusedGatedRead.apply(cached, q, g, sizes, counts, 0.7)
    flat = cached.permute(0, 2, 1, 3, 4).reshape(B, H, N * K, V)
    eager = _GatedRead.apply(flat, q, g, sizes, counts, 0.7)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(fused, eager) < tol
    for a, b in zip(torch.autograd.grad((fused * dr).sum(), (cached, q, g)),
                    torch.autograd.grad((eager * dr).sum(), (cached, q, g)), strict=True):
        assert rel_err(a, b) < tol


def test_gated_read_kernel_gradcheck_and_bad_pieces():
    require_native()
    from growmem.caching.wrapper import _FusedGatedRead

    gen = torch.Generator().manual_seed(1)
    cached = torch.randn(1, 3, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 9, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.rand(1, 9, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, q, g: _FusedGatedRead.apply(c, q, g, [3, 3, 3], [0, 2, 3], 0.5),
                                    (cached, q, g))
    with pytest.raises(ValueError, match="do not cover"):
        _native.gated_read_forward(cached, q, g, [3, 3], [0, 1], 0.5)


@pytest.mark.parametrize("agg", ["grm", "soup"])
def test_grm_layer_uses_the_kernel_and_equals_the_eager_path(monkeypatch, agg):
    require_native()
    import growmem.caching.wrapper as wr
    from growmem.caching import CachedMemory, MCConfig
    from growmem.memories import LinearAttentionMemory

    mem = CachedMemory(LinearAttentionMemory(2, 8, 8, 8), agg, MCConfig(segment_size=16)).double()
    gen = torch.Generator().manual_seed(5)
    T = 61
    leaves = [torch.randn(1, T, 2, 8, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(4)]
    ran = _count_forwards(monkeypatch, wr._FusedGatedRead)

    def run():
        y = mem(*leaves[:3], {"u": leaves[3]}, initial_state=mem.new_state(1, T))[0]
        return y, torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(), leaves)

    y, grads = run()
    assert ran
    monkeypatch.setenv("GROWMEM_NATIVE", "0")
    y0, grads0 = run()
    assert rel_err(y, y0) < 1e-12
    for a, b in zip(grads, grads0, strict=True):
        assert rel_err(a, b) < 1e-11


def test_cli_info_says_which_path_runs(monkeypatch, capsys):
    from growmem.cli import main as cli_main

    require_native()
    assert cli_main(["info"]) == 0
    assert "fused CPU kernels: on" in capsys.readouterr().out
    monkeypatch.setenv("GROWMEM_NATIVE", "0")
    assert cli_main(["info"]) == 0
    assert "fused CPU kernels: off" in capsys.readouterr().out
    monkeypatch.delenv("GROWMEM_NATIVE")
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_error", "NativeBuildError: no C++ compiler found")
    assert cli_main(["info"]) == 0
    assert "unavailable, the PyTorch path runs (NativeBuildError: no C++ compiler found)" in capsys.readouterr().out


# -- linear attention / scalar-decay GLA (the delta kernel with beta = None) -------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gate", ["none", "scalar", "strong"])
@pytest.mark.parametrize("T,C", [(150, 64), (33, 16), (1, 64)])
def test_gla_kernel_as_accurate_as_eager(monkeypatch, dtype, gate, T, C):
    """chunk_gla (no / scalar decay) through the fused kernel: outputs, chunk states, final state and
    every grad (for a loss on all three) against the eager form in float64 on the same values; the
    fused error is within 2x of the eager path's in the same dtype (or below 1e-5 / 1e-9)."""
    require_native()
    from growmem.ops.gla import chunk_gla

    gen = torch.Generator().manual_seed(T + C)
    B, H, K, V = 2, 3, 16, 24
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    s0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    g = None if gate == "none" else F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64) + 2)
    if gate == "strong":
        g = g - 12.0  # every chunk of 16 decays past the factoring limit
    NC = -(-T // C)
    w = (torch.randn(B, T, H, V, generator=gen, dtype=torch.float64),
         torch.randn(B, NC, H, K, V, generator=gen, dtype=torch.float64),
         torch.randn(B, H, K, V, generator=gen, dtype=torch.float64))
    calls = []
    spy = _spy(_native.delta_rule_backward, calls)

    def run(dt, native):
        leaves = [None if x is None else x.to(dt).requires_grad_(True) for x in (q, k, v, g, s0)]
        with monkeypatch.context() as m:
            m.setattr(gla_mod, "delta_rule_backward", spy)
            if not native:
                m.setenv("GROWMEM_NATIVE", "0")
            o, S, cs = chunk_gla(*leaves[:4], initial_state=leaves[4], output_final_state=True, chunk_size=C,
                                 return_chunk_states=True)
            loss = (o * w[0].to(dt)).sum() + (cs * w[1].to(dt)).sum() + (S * w[2].to(dt)).sum()
            used = [x for x in leaves if x is not None]
            return [o, cs, S, *torch.autograd.grad(loss, used)]

    ref = run(torch.float64, False)
    calls.clear()
    fused = run(dtype, True)
    assert calls == [True]
    eager = run(dtype, False)
    floor = 1e-5 if dtype == torch.float32 else 1e-9  # (g's grad under strong decay: cancellation ~1e-10)
    for a, b, r in zip(fused, eager, ref, strict=True):
        err_fused, err_eager = rel_err(a.double(), r), rel_err(b.double(), r)
        assert err_fused <= max(2 * err_eager, floor), (err_fused, err_eager)


# -- pooled keys and the online memory's score ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("pieces,count0,with_pool", [
    ([(0, 5, True), (5, 13, True), (13, 16, False)], 0, False),  # fresh start, last piece open
    ([(0, 3, True), (3, 11, True)], 5, True),  # continues a segment (its pool carried in), ends on a segment
    ([(0, 7, False)], 2, True),  # one open piece continuing a segment: no finished pool (J = 0)
    ([(0, 7, False)], 4, False),  # continues a segment whose pool is None (zero)
])
def test_pool_scores_kernel_equals_eager(monkeypatch, dtype, pooling, pieces, count0, with_pool):
    """CachedMemory._pools through the fused kernel (online scores, finished pools, running pool) and the
    grads of u, k and the carried-in pool equal the PyTorch path, for fresh and continued segments,
    sum and mean pooling."""
    require_native()
    import growmem.caching.wrapper as wr
    from growmem.caching import CachedMemory, MCConfig, MCState
    from growmem.memories import LinearAttentionMemory

    mem = CachedMemory(LinearAttentionMemory(2, 4, 4, 8), "grm", MCConfig(segment_size=8, pooling=pooling))
    T = pieces[-1][1]
    gen = torch.Generator().manual_seed(T + count0)
    u, k = (torch.randn(2, T, 2, 4, generator=gen, dtype=dtype) for _ in range(2))
    p0 = torch.randn(2, 2, 4, generator=gen, dtype=dtype) if with_pool else None
    w = [torch.randn(2, T, 2, 1, generator=gen, dtype=dtype), None, torch.randn(2, 2, 4, generator=gen, dtype=dtype)]
    ran = _count_forwards(monkeypatch, wr._FusedPoolScores)

    def run(native):
        leaves = [x.clone().requires_grad_(True) for x in (u, k)] + ([p0.clone().requires_grad_(True)] if with_pool
                                                                      else [])
        st = MCState(pool=leaves[2] if with_pool else None, count=count0)
        with monkeypatch.context() as m:
            if not native:
                m.setenv("GROWMEM_NATIVE", "0")
            fin, s_on, last = mem._pools(leaves[1], leaves[0], st, pieces)
        loss = (s_on * w[0]).sum() + (last * w[2]).sum() + (0 if fin is None else (fin * fin).sum())
        return [s_on, last] + ([] if fin is None else [fin]) + list(torch.autograd.grad(loss, leaves))

    fused = run(True)
    assert ran
    eager = run(False)
    assert len(fused) == len(eager)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(fused, eager, strict=True):
        assert rel_err(a, b) < tol
