"""Tests of deqlite.delta: the delta rule, its memory rules, MAC accounting, sparse path."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deqlite.delta import (
    DeltaConv2d,
    DeltaLinear,
    configure,
    delta_layers,
    delta_mode,
    mac_summary,
    reset_all,
    to_delta,
)


DT = torch.float64


def _walk(shape, n, scale=0.3, seed=0):
    """A random walk of inputs: successive inputs differ a little, like DEQ iterates."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=DT)
    out = [a]
    for _ in range(n - 1):
        a = a + scale * torch.randn(shape, generator=g, dtype=DT) * (torch.rand(shape, generator=g, dtype=DT) < 0.5)
        out.append(a)
    return out


def _linear_pair(sparse=False, memory="reset", threshold=0.0, bias=True):
    torch.manual_seed(0)
    ref = nn.Linear(6, 5, bias=bias).to(DT)
    lin = DeltaLinear.from_dense(ref, threshold=threshold, memory=memory, sparse=sparse).eval()
    return ref, lin


def _conv_pair(sparse=False, memory="reset", threshold=0.0, **kw):
    torch.manual_seed(0)
    ref = nn.Conv2d(3, 4, 3, **kw).to(DT)
    conv = DeltaConv2d.from_dense(ref, threshold=threshold, memory=memory, sparse=sparse).eval()
    return ref, conv


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("memory", ["reset", "accumulate"])
def test_threshold_zero_reproduces_dense_linear(sparse, memory):
    ref, lin = _linear_pair(sparse, memory)
    with torch.no_grad():
        for a in _walk((7, 6), 6):
            torch.testing.assert_close(lin(a), ref(a), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=1), dict(dilation=2)])
def test_threshold_zero_reproduces_dense_conv(sparse, kw):
    ref, conv = _conv_pair(sparse, **kw)
    with torch.no_grad():
        for a in _walk((2, 3, 7, 7), 5):
            torch.testing.assert_close(conv(a), ref(a), rtol=0, atol=1e-12)


@pytest.mark.parametrize("memory", ["reset", "accumulate"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sparse_path_equals_masked_path(memory, kind):
    make = _linear_pair if kind == "linear" else (lambda *a, **k: _conv_pair(*a, padding=1, **k))
    shape = (9, 6) if kind == "linear" else (3, 3, 6, 6)
    _, masked = make(False, memory, threshold=0.25)
    _, sparse = make(True, memory, threshold=0.25)
    with torch.no_grad():
        for a in _walk(shape, 8, scale=0.2):
            torch.testing.assert_close(sparse(a), masked(a), rtol=0, atol=1e-12)
    # the pattern must really be sparse for the comparison to mean something
    fr = [r.active / r.numel for r in sparse.records[1:]]
    assert 0.0 < min(fr) and max(fr) < 0.9


def test_sparse_path_handles_no_fired_entry():
    _, lin = _linear_pair(True, threshold=10.0)
    a = torch.randn(4, 6, dtype=DT)
    with torch.no_grad():
        y0 = lin(a)
        y1 = lin(a + 0.01)
    assert torch.equal(y0, y1)
    assert lin.records[-1].performed_macs == 0


def test_bias_is_added_once():
    lin = DeltaLinear(3, 2, threshold=0.0, dtype=DT).eval()
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([1.0, -2.0]))
        outs = [lin(torch.randn(1, 3, dtype=DT)) for _ in range(4)]
    for y in outs:
        torch.testing.assert_close(y, torch.tensor([[1.0, -2.0]], dtype=DT))


def test_reset_rule_drops_small_changes_accumulate_keeps_them():
    """Steps of 0.04 below a threshold of 0.1: 'reset' never fires, 'accumulate' fires once
    the accumulated change passes the threshold."""
    outs = {}
    for memory in ("reset", "accumulate"):
        lin = DeltaLinear(1, 1, bias=False, threshold=0.1, memory=memory, dtype=DT).eval()
        with torch.no_grad():
            lin.weight.fill_(1.0)
            outs[memory] = [lin(torch.full((1, 1), 0.04 * k, dtype=DT)).item() for k in range(6)]
    assert outs["reset"] == [0.0] * 6
    assert outs["accumulate"][:3] == [0.0, 0.0, 0.0]
    assert outs["accumulate"][3] == pytest.approx(0.12)  # 0.12 - 0 > 0.1 fires at step 3
    assert outs["accumulate"][5] == pytest.approx(0.12)  # 0.20 - 0.12 = 0.08 has not fired yet


@settings(max_examples=30, deadline=None)
@given(threshold=st.floats(0.0, 1.0), seed=st.integers(0, 10_000), sparse=st.booleans())
def test_accumulate_error_is_bounded_by_threshold(threshold, seed, sparse):
    """Under 'accumulate', every input entry is within threshold of its cached value, so
    |y - (W a + b)| <= threshold * (row sums of |W|), at every call."""
    torch.manual_seed(seed)
    ref = nn.Linear(5, 4).to(DT)
    lin = DeltaLinear.from_dense(ref, threshold=threshold, memory="accumulate", sparse=sparse).eval()
    bound = threshold * ref.weight.abs().sum(dim=1) + 1e-12
    with torch.no_grad():
        for a in _walk((3, 5), 6, scale=0.5, seed=seed):
            err = (lin(a) - ref(a)).abs()
            assert bool((err <= bound).all())


def test_reset_rule_error_can_exceed_that_bound():
    """The 'reset' rule forgets sub-threshold changes, so drift builds up beyond one threshold."""
    lin = DeltaLinear(1, 1, bias=False, threshold=0.1, memory="reset", dtype=DT).eval()
    with torch.no_grad():
        lin.weight.fill_(1.0)
        for k in range(11):
            y = lin(torch.full((1, 1), 0.09 * k, dtype=DT))
    assert abs(y.item() - 0.9) > 0.5


def test_mac_accounting_linear_by_hand():
    lin = DeltaLinear(3, 4, threshold=0.5, dtype=DT).eval()
    with torch.no_grad():
        lin(torch.zeros(2, 3, dtype=DT))
        lin(torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.0, 0.0]], dtype=DT))  # one entry fires
    first, second = lin.records
    assert first.dense_call and first.dense_macs == 2 * 3 * 4 + 2 * 4 == first.performed_macs
    assert not second.dense_call
    assert (second.active, second.performed_macs, second.sub_ops) == (1, 4, 6)
    s = mac_summary(lin)
    assert s.dense.tolist() == [32, 32] and s.performed.tolist() == [32, 4]
    assert s.reduction == pytest.approx(1 - (32 + 4 + 6) / 64)


def _brute_force_conv_macs(conv, fired):
    """Count (output position, input entry, tap) triples with a fired input, by loops."""
    B, C, H, W = fired.shape
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    n = 0
    for b in range(B):
        for c in range(C):
            for i in range(Ho):
                for j in range(Wo):
                    for u in range(kh):
                        for v in range(kw):
                            r, q = i * sh - ph + u * dh, j * sw - pw + v * dw
                            if 0 <= r < H and 0 <= q < W and fired[b, c, r, q]:
                                n += 1
    return n * conv.out_channels


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=1), dict(dilation=2, padding=2)])
def test_mac_accounting_conv_counts_kernel_area(kw):
    _, conv = _conv_pair(threshold=0.3, **kw)
    seq = _walk((2, 3, 6, 6), 2, scale=0.5)
    with torch.no_grad():
        for a in seq:
            y = conv(a)
    dense, second = conv.records
    assert dense.dense_macs == y.numel() * 3 * 3 * 3 + y.numel()  # C_in * kh * kw + bias
    fired = (seq[1] - seq[0]).abs() > 0.3
    assert second.performed_macs == _brute_force_conv_macs(conv, fired)
    assert second.sub_ops == seq[1].numel()


def test_train_and_inference_thresholds_are_separate():
    lin = DeltaLinear(4, 3, threshold=10.0, train_threshold=0.0, dtype=DT)
    a0, a1 = torch.zeros(2, 4, dtype=DT), torch.ones(2, 4, dtype=DT)
    with torch.no_grad():
        lin.train()
        lin(a0), lin(a1)
        assert lin.records[-1].active == 8
        lin.eval()
        lin.reset()
        lin(a0), lin(a1)
        assert lin.records[-1].active == 0
    assert DeltaLinear(2, 2, threshold=0.3).train_threshold == 0.3  # default: the same


def test_gradient_calls_run_dense_and_match_nn_linear():
    ref, lin = _linear_pair(threshold=0.5)
    a = torch.randn(3, 6, dtype=DT)
    with torch.no_grad():
        lin(a + 1.0)  # fill the cache
    y = lin(a)  # autograd on: dense
    y.sum().backward()
    ref_y = ref(a)
    torch.testing.assert_close(y, ref_y)
    assert lin.records[-1].dense_call
    assert ref.weight.grad is not None  # shared Parameter
    g = ref.weight.grad.clone()
    ref.weight.grad = None
    ref(a).sum().backward()
    torch.testing.assert_close(g, ref.weight.grad)


def test_reset_makes_next_call_dense_and_shape_change_too():
    _, lin = _linear_pair(threshold=0.1)
    with torch.no_grad():
        lin(torch.zeros(2, 6, dtype=DT))
        lin(torch.zeros(2, 6, dtype=DT))
        lin.reset()
        lin(torch.zeros(2, 6, dtype=DT))
        lin(torch.zeros(3, 6, dtype=DT))  # new batch size: cannot be a delta of the old one
    assert [r.dense_call for r in lin.records] == [True, False, True, True]


def test_disabled_layer_is_dense_and_still_counted():
    ref = nn.Linear(4, 2).to(DT)
    lin = DeltaLinear.from_dense(ref, threshold=5.0, enabled=False).eval()
    with torch.no_grad():
        for a in _walk((3, 4), 3):
            torch.testing.assert_close(lin(a), ref(a), rtol=0, atol=0)
    assert all(r.dense_call for r in lin.records) and len(lin.records) == 3


def test_model_helpers_share_parameters_and_restore_settings():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 5))
    w_conv, w_lin = net[0].weight, net[3].weight
    to_delta(net, enabled=False)
    assert isinstance(net[0], DeltaConv2d) and isinstance(net[3], DeltaLinear)
    assert net[0].weight is w_conv and net[3].weight is w_lin
    assert len(delta_layers(net)) == 2
    net.eval()
    x = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        dense = net(x)
        with delta_mode(net, threshold=0.05, memory="accumulate", record_fired=True):
            net(x)
            y = net(x + 0.01 * torch.randn_like(x))
        s = mac_summary(net)
    assert s.n_calls == 2 and s.performed[1] < s.dense[1]
    assert s.fired_per_dim is not None and s.fired_per_dim.shape == (2, 2)
    assert set(s.per_layer) == {"0", "3"}
    assert not net[0].enabled and net[0].threshold == 0.0 and net[0]._a_prev is None
    assert y.shape == dense.shape
    reset_all(net)
    assert net[0].records == []


def test_delta_layer_inside_solve_reaches_dense_fixed_point():
    from deqlite import solve
    torch.manual_seed(0)
    W = torch.randn(8, 8, dtype=DT)
    W = 0.7 * W / torch.linalg.matrix_norm(W, ord=2)
    lin = DeltaLinear(8, 8, dtype=DT).eval()
    with torch.no_grad():
        lin.weight.copy_(W)
    x = torch.randn(4, 8, dtype=DT)
    f = lambda z: torch.tanh(lin(z) + x)
    lin.enabled = False
    z_dense, _ = solve(f, torch.zeros(4, 8, dtype=DT), solver="picard", tol=1e-10, max_iter=200)
    lin.enabled = True
    for solver in ("picard", "km", "anderson", "broyden"):
        lin.reset()
        lin.clear_records()
        z, tr = solve(f, torch.zeros(4, 8, dtype=DT), solver=solver, tol=1e-10, max_iter=200)
        assert tr.status == "converged", solver
        torch.testing.assert_close(z, z_dense, rtol=0, atol=1e-8)
        assert len(lin.records) == tr.nfe


@pytest.mark.parametrize("bad, match", [
    (dict(threshold=-0.1), "threshold must be a finite number >= 0"),
    (dict(threshold=float("nan")), "threshold must be"),
    (dict(train_threshold=-1.0), "train_threshold must be"),
    (dict(memory="forget"), "memory must be one of"),
])
def test_bad_options_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        DeltaLinear(2, 2, **bad)


def test_bad_inputs_and_unsupported_configurations_raise():
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3\)"):
        DeltaLinear(3, 2)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        DeltaConv2d(3, 2, 3)(torch.zeros(3, 5, 5))
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        DeltaConv2d(3, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="groups=1"):
        DeltaConv2d(4, 4, 3, groups=2, sparse=True)
    with pytest.raises(ValueError, match="no delta layers"):
        configure(nn.Sequential(nn.Linear(2, 2)), threshold=0.1)
    with pytest.raises(ValueError, match="no delta layers"):
        mac_summary(nn.Linear(2, 2))
    sn = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="parametrized"):
        to_delta(nn.Sequential(sn))
    with pytest.raises(TypeError, match="nn.Linear"):
        DeltaLinear.from_dense(nn.Conv2d(1, 1, 1))


def test_reindex_cache_moves_rows():
    _, lin = _linear_pair(threshold=0.0)
    a = torch.randn(3, 6, dtype=DT)
    with torch.no_grad():
        y = lin(a)
        lin.reindex_cache(torch.tensor([2, 0, 1]))
        y2 = lin(a[[2, 0, 1]])  # same inputs in the new order: nothing changed
    assert torch.equal(y2, y[[2, 0, 1]]) and lin.records[-1].performed_macs == 0
    with pytest.raises(ValueError, match="1-D long tensor"):
        lin.reindex_cache(torch.tensor([[0]]))


# -- the settings as data: DeltaConfig bound by delta_mode, never written into the layers ----

def test_delta_mode_binds_a_config_and_writes_nothing_into_the_layers():
    from deqlite.delta import DeltaConfig

    net = nn.Sequential(DeltaLinear(3, 3, enabled=False), nn.Tanh(), DeltaLinear(3, 2, enabled=False))
    own = [m.config for m in delta_layers(net)]
    with delta_mode(net, threshold=0.2, memory="accumulate", sparse=True):
        for m in delta_layers(net):
            assert m.config is own[delta_layers(net).index(m)]  # the layer's own config: untouched
            assert m.settings == DeltaConfig(True, 0.2, 0.2, "accumulate", True, True, False)
            assert m.active_threshold == 0.2 and not m.enabled  # .enabled reads the own config
        with delta_mode(net, threshold=0.5, train_threshold=0.1):  # blocks nest
            assert net[0].settings.threshold == 0.5 and net[0].settings.memory == "reset"
            net.train()
            assert net[0].active_threshold == 0.1
            net.eval()
        assert net[0].settings.threshold == 0.2  # the outer binding is back
    assert [m.settings for m in delta_layers(net)] == own


def test_delta_mode_unbinds_when_the_block_raises():
    lin = DeltaLinear(2, 2, enabled=False)
    with pytest.raises(RuntimeError, match="boom"):
        with delta_mode(lin, threshold=0.3):
            lin(torch.zeros(1, 2))
            raise RuntimeError("boom")
    assert lin.settings is lin.config and lin._a_prev is None and not lin.settings.enabled


def test_delta_mode_none_runs_dense_and_records():
    torch.manual_seed(0)
    lin = DeltaLinear(4, 3, threshold=0.5)  # enabled by default: the block still runs it dense
    x = torch.randn(2, 4)
    with torch.no_grad(), delta_mode(lin, None, record_fired=True):
        lin(x)
        lin(x + 1e-3)
    s = mac_summary(lin)
    assert s.performed.tolist() == s.dense.tolist() and s.fired_per_dim.shape == (2, 4)
    assert lin.settings.enabled and lin.threshold == 0.5  # the own config again


def test_a_thread_sees_its_own_bindings():
    """The binding lives in a context variable: a worker thread started inside the block runs
    the layer on its own config (documented in delta_mode)."""
    import threading

    lin = DeltaLinear(2, 2, enabled=False)
    seen = []
    with delta_mode(lin, threshold=0.4):
        t = threading.Thread(target=lambda: seen.append(lin.settings.enabled))
        t.start()
        t.join()
        seen.append(lin.settings.enabled)
    assert seen == [False, True]


def test_layer_attributes_replace_the_own_config_and_are_validated():
    from deqlite.delta import DeltaConfig

    lin = DeltaLinear(2, 2, threshold=0.1)
    lin.threshold = 0.3
    assert lin.config == DeltaConfig(threshold=0.3, train_threshold=0.1)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        lin.threshold = -1.0
    with pytest.raises(ValueError, match="memory must be one of 'reset', 'accumulate'"):
        DeltaConfig(memory="keep")
    with pytest.raises(TypeError, match="has no field"):
        DeltaConfig().replace(treshold=0.1)
    old = configure(nn.Sequential(lin), threshold=0.2, memory="accumulate")
    assert old["threshold"] == 0.3 and lin.config.memory == "accumulate" and lin.threshold == 0.2
