"""Small DEQ models used by the chapters.

* :mod:`deqlite.models.inr`: DEQ-Fourier / DEQ-Siren implicit neural representations.
* :mod:`deqlite.models.rnn`: the 20-unit RNN cell of DeltaDEQ's Fig. 1.
"""
from .inr import DEQINR, DEQFourier, DEQSiren, evaluate_delta, fit_inr, psnr
from .rnn import SineRNN, fit_sine_rnn

__all__ = ["DEQINR", "DEQFourier", "DEQSiren", "SineRNN", "evaluate_delta", "fit_inr",
           "fit_sine_rnn", "psnr"]
