"""Tests of the convolutional DEQ with delta convolutions and the patch-level MAC count."""
import pytest
import torch

from deqlite.data import load_digits_tensors
from deqlite.delta import DeltaConv2d, delta_mode
from deqlite.models.conv import ConvDEQ, evaluate_conv_delta, fit_conv_deq


def test_patch_macs_count_whole_patches():
    conv = DeltaConv2d(2, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv(torch.zeros(1, 2, 5, 5))
        a = torch.zeros(1, 2, 5, 5)
        a[0, 0, 2, 2] = 1.0  # one entry in the middle fires
        conv(a)
    r = conv.records[-1]
    # element level: the entry meets 3 outputs at 9 taps; patch level: the 9 output positions
    # whose window holds it are computed in full (2 channels x 9 taps x 3 outputs each)
    assert r.performed_macs == 9 * 3
    assert r.patch == 9 * 2 * 9 * 3
    with torch.no_grad():
        a2 = a.clone()
        a2[0, 1, 0, 0] = 1.0  # a corner: 4 output positions (the rest is padding)
        conv(a2)
    assert conv.records[-1].patch == 4 * 2 * 9 * 3
    assert conv.records[0].patch == conv.records[0].performed_macs  # dense call


def test_conv_deq_delta_counts_per_layer():
    Xtr, ytr, Xte, yte = load_digits_tensors()
    net = ConvDEQ(channels=4, seed=0)
    fit = fit_conv_deq(net, Xtr, ytr, steps=3, batch=64)
    assert len(fit.loss) == 3 and all(n > 0 for n in fit.nfe)
    assert net.conv1.weight.grad is not None  # the convolutions inside the fixed point train
    x, y = Xte[:50], yte[:50]
    dense = evaluate_conv_delta(net, x, y, None)
    zero = evaluate_conv_delta(net, x, y, 0.0)
    big = evaluate_conv_delta(net, x, y, 0.3)
    assert dense.performed_macs == dense.dense_macs and dense.patch_macs == dense.dense_macs
    assert zero.accuracy == dense.accuracy  # threshold 0: the dense result up to rounding
    assert set(big.per_layer) == {"conv1", "conv2"}
    for layer in big.per_layer.values():
        assert 0 < layer["sparsity"] <= 1
        assert layer["patch_reduction"] <= layer["reduction"]  # whole patches skip less
    assert big.reduction_vs(dense, patch=True) <= big.reduction_vs(dense) < 1
    assert big.reduction_vs(dense) > zero.reduction_vs(dense)
    # the dense baseline stays dense inside someone else's delta block
    with delta_mode(net, 0.3):
        inside = evaluate_conv_delta(net, x, y, None)
    assert inside.performed_macs == inside.dense_macs == dense.dense_macs
    assert inside.iterations == dense.iterations and inside.accuracy == dense.accuracy


def test_conv_deq_errors():
    with pytest.raises(ValueError, match="channels must be an integer >= 1"):
        ConvDEQ(channels=0)
    net = ConvDEQ(channels=2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 64\)"):
        net(torch.zeros(3, 10))
    with pytest.raises(ValueError, match="same number of rows"):
        fit_conv_deq(net, torch.zeros(3, 64), torch.zeros(4, dtype=torch.long))
