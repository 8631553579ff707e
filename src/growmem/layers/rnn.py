"""Classic gated RNN baselines as token mixers: torch's GRU and LSTM (Cho et al. 2014; Hochreiter &
Schmidhuber 1997), x ``[B, T, D]`` -> ``[B, T, D]`` with the hidden state as the decoding cache."""

from __future__ import annotations

import torch
from torch import nn

from growmem.layers.base import Cache, TokenMixer


class RNNMixer(TokenMixer):
    """``kind`` = ``gru`` or ``lstm``; hidden size ``hidden`` (default ``d_model``), then a linear map back
    to ``d_model``. The cache holds the hidden (and cell) state ``[1, B, hidden]``."""

    def __init__(self, d_model: int, kind: str = "gru", hidden: int | None = None) -> None:
        super().__init__()
        if kind not in ("gru", "lstm"):
            raise ValueError(f"kind must be gru or lstm, got {kind!r}")
        hidden = hidden or d_model
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.d_model, self.kind = d_model, kind
        self.rnn = (nn.GRU if kind == "gru" else nn.LSTM)(d_model, hidden, batch_first=True)
        self.out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor, cache: Cache | None = None,
                use_cache: bool = False) -> tuple[torch.Tensor, Cache | None]:
        self.check_input(x, self.d_model)
        h0 = None
        if cache is not None:
            h0 = cache["h"] if self.kind == "gru" else (cache["h"], cache["c"])
        y, hn = self.rnn(x, h0)
        if not use_cache:
            return self.out(y), None
        new = {"h": hn} if self.kind == "gru" else {"h": hn[0], "c": hn[1]}
        return self.out(y), new
