"""Small DEQ models used by the chapters.

* :mod:`deqlite.models.inr`: DEQ-Fourier / DEQ-Siren implicit neural representations.
* :mod:`deqlite.models.rnn`: the 20-unit RNN cell of DeltaDEQ's Fig. 1.
* :mod:`deqlite.models.conv`: a small convolutional DEQ classifier with delta convolutions.
* :mod:`deqlite.models.digits`: digits DEQs that are slow to solve (chapter 4, neural solvers).
"""
from .conv import ConvDEQ, evaluate_conv_delta, fit_conv_deq
from .digits import frozen_map, slow_digits_deq
from .inr import DEQINR, DEQFourier, DEQSiren, fit_inr, psnr
from .rnn import SineRNN, fit_sine_rnn


def __getattr__(name: str):
    # evaluate_delta lives in deqlite.delta.evaluate, which imports this package: on first use
    if name == "evaluate_delta":
        from ..delta.evaluate import evaluate_delta
        return evaluate_delta
    raise AttributeError(f"module 'deqlite.models' has no attribute {name!r}")


__all__ = ["ConvDEQ", "DEQINR", "DEQFourier", "DEQSiren", "SineRNN", "evaluate_conv_delta",
           "evaluate_delta", "fit_conv_deq", "fit_inr", "fit_sine_rnn", "frozen_map", "psnr",
           "slow_digits_deq"]
