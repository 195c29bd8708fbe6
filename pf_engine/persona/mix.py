"""Mix: the persona gates of one forward, read by every adapted layer.

For the N = B * T token rows of a forward, ``gates`` [N, K] fp32 weights the bank's K experts
(row t of layer l computes y = W x + sum_k g[t, k] s_k B_k A_k x, model/linear.py).  Fixed
gates (explicit personas, the sequence router) are the same in every layer; a zero row runs the
base model.  With a token router, the rows flagged in ``token_rows`` get fresh gates in every
layer from the hidden state entering it (``enter_layer``), and ``token_sum`` adds them up over
layers for reporting (``request_sums`` splits it per request).

``Mix.for_rows`` is the one place a forward's Mix is built from per-request gate rows.
"""
from __future__ import annotations

import torch
from pf_kernels.layout import RankLayout


class Mix:
    def __init__(self, gates: torch.Tensor, token_router=None,
                 token_rows: torch.Tensor | None = None,
                 active: tuple | None = None, any_token: bool | None = None, static: bool = False):
        """gates [N, K] fp32; token_rows [N] bool.  active / any_token: what the caller knows on
        the host (the scheduler does): the expert ids with a nonzero gate somewhere, and whether
        any row is token-routed.  Left None, they are read from the tensors, which costs a host
        sync on a GPU.  static: never read the device (a step captured in a CUDA graph)."""
        self.fixed, self.static = gates, static
        if any_token is None:
            any_token = token_rows is not None and bool(token_rows.any())
        self.token_router = token_router if any_token else None
        self.token_rows = token_rows
        self.token_sum = None
        if self.token_router is not None:     # every layer sets its own gates (enter_layer)
            active = tuple(range(gates.shape[1]))
        self._set(gates, active)

    @classmethod
    def for_rows(cls, gates: torch.Tensor, token_rows: torch.Tensor, T: int, token_router=None,
                 active: tuple | None = None, any_token: bool | None = None,
                 static: bool = False) -> "Mix":
        """The Mix of a forward over n requests with T tokens each: request b's gate row
        gates[b] [K] and token-routing flag token_rows[b] hold for its rows b*T..b*T+T-1."""
        if T > 1:
            gates, token_rows = gates.repeat_interleave(T, 0), token_rows.repeat_interleave(T, 0)
        return cls(gates, token_router, token_rows, active, any_token, static)

    def _set(self, gates: torch.Tensor, active: tuple | None = None) -> None:
        self.gates = gates
        self.active = active if active is not None else tuple(
            torch.nonzero(gates.abs().sum(0)).flatten().tolist())
        self._expanded = {}
        self._live = None
        self.cache = {}                  # the backend's metadata for these gates, by layout

    def live(self) -> tuple:
        """The expert ids whose gate is nonzero in some row of this layer: ``active``, or under
        token routing read from the gates (a host sync; all experts in a static step)."""
        if self.token_router is None or self.static:
            return self.active
        if self._live is None:
            self._live = tuple(torch.nonzero(self.gates.abs().sum(0)).flatten().tolist())
        return self._live

    def expanded(self, layout: RankLayout, dtype: torch.dtype) -> torch.Tensor:
        """G_exp^T [R, N] = (gates[:, col_expert] * col_scaling)^T, computed once per layout."""
        g = self._expanded.get((layout, dtype))
        if g is None:
            g = (self.gates[:, layout.col_expert] * layout.col_scaling).t().to(dtype)
            self._expanded[(layout, dtype)] = g
        return g

    def enter_layer(self, layer: int, x: torch.Tensor) -> "Mix":
        """Enter ``layer``: its input x [B, T, d] sets this Mix's gates for it, in place (token
        routing recomputes them and adds them to ``token_sum``; fixed gates stay), and the Mix
        is returned.  All experts stay active, so the grouped and kernel paths need no host
        sync."""
        if self.token_router is not None:
            g = self.token_router(layer, x.reshape(-1, x.shape[-1])).float()
            g = torch.where(self.token_rows.unsqueeze(1), g, self.fixed)
            self.token_sum = g if self.token_sum is None else self.token_sum + g
            self._set(g, self.active)
        return self

    def request_sums(self, n: int, T: int,
                     valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """The token-routed gates summed over layers and each request's tokens: [n, K] for the n
        requests of the forward (T rows each; ``valid`` [n, T] bool marks real tokens), on the
        device; None without token routing."""
        if self.token_sum is None:
            return None
        sums = self.token_sum[:n * T].view(n, T, -1)
        if valid is not None:
            sums = sums * valid.unsqueeze(-1)
        return sums.sum(1)
