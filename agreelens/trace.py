"""Exact LSTM tracing of an :class:`~agreelens.model.RNNModel` from its ``nn.LSTM`` weights.

PyTorch's LSTM, layer by layer and step by step (gate order i, f, g, o in ``weight_ih_l{k}``,
``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``)::

    i, f, g, o = split(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)
    i, f, o = sigmoid(i, f, o);  g = tanh(g);  c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)

Units are numbered as in Lakretz et al. (2019): 1..H in layer 1, H+1..2H in layer 2 (unit 776 of a
650-unit model is layer 2, index 125). Activations are named ``L1.i L1.f L1.g L1.o L1.c L1.h L2.i ...``
(layers 1-based), as hook points: :func:`run_with_cache` returns them, a hook ``fn(value, t)`` sees a
(B, H) activation at step t and may return a replacement (None keeps it).

Ablation: a unit mask (1 = kept, 0 = ablated; shape (layers*H,) or (B, layers*H), one mask per batch
column) forces a unit's h to 0 wherever it is read: by its own layer at the next step, by the next
layer and, in the top layer, by the decoder. That equals zeroing the unit's outgoing weights. The
unit's own i, f, g, o, c, h are computed and cached as usual. Tracing follows eval mode (no dropout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("i", "f", "g", "o", "c", "h")
Hook = Callable[[torch.Tensor, int], "torch.Tensor | None"]


def lstm_of(model: nn.Module) -> nn.LSTM:
    """The model's ``rnn``, checked to be a plain time-major unidirectional LSTM."""
    rnn = getattr(model, "rnn", None)
    if not isinstance(rnn, nn.LSTM):
        raise TypeError(f"expected a model with an nn.LSTM `rnn`, got {type(rnn).__name__}")
    if rnn.batch_first or rnn.bidirectional or rnn.proj_size or not rnn.bias:
        raise ValueError("tracing supports time-major, unidirectional LSTMs with biases and no projection")
    return rnn


def layer_weights(rnn: nn.LSTM, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_ih, W_hh, b_ih + b_hh)`` of layer ``layer`` (1-based)."""
    k = layer - 1
    b = getattr(rnn, f"bias_ih_l{k}") + getattr(rnn, f"bias_hh_l{k}")
    return getattr(rnn, f"weight_ih_l{k}"), getattr(rnn, f"weight_hh_l{k}"), b


# ---------------------------------------------------------------------------------------- units


def _check_unit(unit: int, hidden_size: int, layers: int) -> None:
    if isinstance(unit, bool) or not isinstance(unit, int) or not 1 <= unit <= layers * hidden_size:
        ranges = ", ".join(f"layer {k + 1}: {k * hidden_size + 1}..{(k + 1) * hidden_size}" for k in range(layers))
        raise ValueError(f"unit {unit!r} out of range: units are 1..{layers * hidden_size} ({ranges})")


def unit_to_layer_index(unit: int, hidden_size: int, layers: int = 2) -> tuple[int, int]:
    """Unit number (1-based, across layers) -> ``(layer, index)``: layer 1-based, index 0-based."""
    _check_unit(unit, hidden_size, layers)
    return (unit - 1) // hidden_size + 1, (unit - 1) % hidden_size


def layer_index_to_unit(layer: int, index: int, hidden_size: int, layers: int = 2) -> int:
    """Inverse of :func:`unit_to_layer_index`."""
    if not 1 <= layer <= layers:
        raise ValueError(f"layer {layer} out of range: layers are 1..{layers}")
    if not 0 <= index < hidden_size:
        raise ValueError(f"index {index} out of range: indices are 0..{hidden_size - 1}")
    return (layer - 1) * hidden_size + index + 1


def parse_units(spec: str | Iterable[int], hidden_size: int, layers: int = 2) -> list[int]:
    """``"776,988"`` (or a list of ints) -> validated unit numbers."""
    if isinstance(spec, str):
        try:
            units = [int(s) for s in spec.replace(" ", "").split(",") if s]
        except ValueError:
            raise ValueError(f"units must be comma-separated integers, got {spec!r}") from None
    else:
        units = list(spec)
    if not units:
        raise ValueError(f"no units given (units are 1..{layers * hidden_size})")
    for u in units:
        _check_unit(u, hidden_size, layers)
    return units


def unit_mask(units: Iterable[int], hidden_size: int, layers: int = 2, device=None) -> torch.Tensor:
    """A (layers*H,) mask: 0 at the given units, 1 elsewhere."""
    mask = torch.ones(layers * hidden_size, device=device)
    for u in units:
        _check_unit(u, hidden_size, layers)
        mask[u - 1] = 0.0
    return mask


def split_mask(mask: torch.Tensor | None, hidden_size: int, layers: int) -> list[torch.Tensor | None]:
    """Per-layer views (..., H) of a (..., layers*H) mask; None for no mask."""
    if mask is None:
        return [None] * layers
    if mask.size(-1) != layers * hidden_size:
        raise ValueError(f"mask has {mask.size(-1)} units in its last dimension, expected {layers * hidden_size}")
    return list(mask.split(hidden_size, dim=-1))


# ---------------------------------------------------------------------------------------- running


def lstm_step(gates: torch.Tensor, c: torch.Tensor | None = None,
              patch: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
              out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """The LSTM cell update, the one place the gate nonlinearities are computed.

    ``gates`` (..., 4H): the pre-activations ``x W_ih^T + b_ih + h W_hh^T + b_hh`` in gate order i, f, g, o;
    a fresh tensor, overwritten in place by the activations. ``c`` (..., H): the previous cell (None =
    zeros). ``patch(kind, value)`` may replace each activation. ``out``: ``(c, h)`` tensors to write the new
    cell and hidden state into. Returns ``(i, f, g, o, c, h)``, h unmasked."""
    n = gates.size(-1) // 4
    gates[..., : 2 * n].sigmoid_()  # i, f
    gates[..., 2 * n : 3 * n].tanh_()  # g
    gates[..., 3 * n :].sigmoid_()  # o
    i, f, g, o = gates.chunk(4, dim=-1)
    if patch is not None:
        i, f, g, o = patch("i", i), patch("f", f), patch("g", g), patch("o", o)
    c_out, h_out = (None, None) if out is None else out
    c = torch.mul(i, g, out=c_out) if c is None else torch.mul(f, c, out=c_out).addcmul_(i, g)
    if patch is not None:
        c = patch("c", c)
    h = torch.tanh(c, out=h_out).mul_(o)
    if patch is not None:
        h = patch("h", h)
    return i, f, g, o, c, h


def cell(gx: torch.Tensor, h: torch.Tensor | None, c: torch.Tensor | None, w_hh: torch.Tensor,
         patch: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """One LSTM step. ``gx``: the input part of the gates (x W_ih^T + b_ih + b_hh); ``h``: the previous
    hidden state as read (after ablation; None = zeros); ``c``: the previous cell (None = zeros).
    ``patch(kind, value)`` may replace each activation. Returns ``(i, f, g, o, c, h)``."""
    if h is None:
        gates = gx.clone()
    else:
        gates = (h.reshape(-1, h.size(-1)) @ w_hh.T).view(*h.shape[:-1], -1) + gx
    return lstm_step(gates, c, patch)


def run_layer(model: nn.Module, layer: int, x: torch.Tensor, h0: torch.Tensor | None = None,
              c0: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              hooks: dict[str, Hook] | None = None, keep: Iterable[str] = ("h",)):
    """Run LSTM layer ``layer`` (1-based) over inputs ``x`` (T, B, In) as read (already masked).

    ``mask`` (H,) or (B, H): this layer's unit mask, applied where the layer reads its own h (h0
    included). ``hooks``: kind (``"i"`` .. ``"h"``) -> ``fn(value, t)``. Returns ``(states, (h_T, c_T))``
    with ``states[kind]`` the (T, B, H) activations of each kind in ``keep`` (as computed, unmasked)."""
    keep = tuple(keep)
    rnn = lstm_of(model)
    w_ih, w_hh, b = layer_weights(rnn, layer)
    gx = torch.addmm(b, x.reshape(-1, x.size(-1)), w_ih.T).view(x.size(0), x.size(1), -1)
    h, c = h0, c0
    out: dict[str, list[torch.Tensor]] = {k: [] for k in keep}
    for t in range(x.size(0)):
        patch = None
        if hooks:
            def patch(kind, value, t=t):
                fn = hooks.get(kind)
                new = fn(value, t) if fn is not None else None
                return value if new is None else new
        read = None if h is None else (h if mask is None else h * mask)
        acts = cell(gx[t], read, c, w_hh, patch)
        c, h = acts[4], acts[5]
        for k in keep:
            out[k].append(acts[KINDS.index(k)])
    if h is None:  # T == 0
        h = torch.zeros(x.size(1), rnn.hidden_size, dtype=x.dtype, device=x.device)
        c = torch.zeros_like(h)
    return {k: torch.stack(v) if v else x.new_zeros(0, x.size(1), rnn.hidden_size) for k, v in out.items()}, (h, c)


def _names(layers: int) -> list[str]:
    return [f"L{layer}.{k}" for layer in range(1, layers + 1) for k in KINDS]


def _by_layer(named: dict[str, object] | Iterable | None, layers: int) -> list[dict]:
    """``{"L2.h": x}`` (or a list of names / (name, fn) pairs) -> per layer ``{"h": x}``; checks names."""
    valid = _names(layers)
    if named is None:
        return [{} for _ in range(layers)]
    items = named.items() if isinstance(named, dict) else [(n, None) if isinstance(n, str) else n for n in named]
    out: list[dict] = [{} for _ in range(layers)]
    for name, value in items:
        if name not in valid:
            raise ValueError(f"unknown activation {name!r}; names are {', '.join(valid)}")
        layer, kind = name[1:].split(".")
        out[int(layer) - 1][kind] = value
    return out


def run(model: nn.Module, ids: torch.Tensor, hidden=None, mask: torch.Tensor | None = None,
        hooks=None, names: Iterable[str] | None = None):
    """Run the model on ``ids`` (T, B) from ``hidden`` ((h0, c0), each (layers, B, H); None = zeros).

    Returns ``(features, cache, (h_n, c_n))``: ``features`` (T, B, H) is the top layer's h as the
    decoder reads it (ablation applied), ready for ``model.target_log_probs``; ``cache`` maps each of
    ``names`` (default none) to its (T, B, H) activations; ``(h_n, c_n)`` the final states, unmasked.
    ``hooks``: ``{name: fn(value, t)}`` or a list of ``(name, fn)``."""
    rnn = lstm_of(model)
    layers, hsz = rnn.num_layers, rnn.hidden_size
    masks = split_mask(mask, hsz, layers)
    wanted = _by_layer(names, layers)
    hooks_by = _by_layer(hooks, layers)
    x = model.encoder(ids)
    cache: dict[str, torch.Tensor] = {}
    h_n, c_n = [], []
    for k in range(layers):
        h0 = c0 = None
        if hidden is not None:
            h0, c0 = hidden[0][k], hidden[1][k]
        keep = set(wanted[k]) | {"h"}
        states, (h, c) = run_layer(model, k + 1, x, h0, c0, masks[k], hooks_by[k], keep)
        for kind in wanted[k]:
            cache[f"L{k + 1}.{kind}"] = states[kind]
        h_n.append(h)
        c_n.append(c)
        x = states["h"] if masks[k] is None else states["h"] * masks[k]
    return x, cache, (torch.stack(h_n), torch.stack(c_n))


def run_with_cache(model: nn.Module, ids: torch.Tensor, names: Iterable[str] | None = None, hidden=None,
                   mask: torch.Tensor | None = None, hooks=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(features, cache)``: ``cache[name]`` (T, B, H) for every name in ``names`` (default: all)."""
    rnn = lstm_of(model)
    if names is None:
        names = _names(rnn.num_layers)
    features, cache, _ = run(model, ids, hidden, mask, hooks, names)
    return features, cache


@dataclass
class Trace:
    """Every activation of a run, each (layers, T, B, H); ``features`` (T, B, H) as the decoder reads
    it; ``hidden`` the final (h_n, c_n), each (layers, B, H)."""

    i: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    o: torch.Tensor
    c: torch.Tensor
    h: torch.Tensor
    features: torch.Tensor
    hidden: tuple[torch.Tensor, torch.Tensor]


def trace(model: nn.Module, ids: torch.Tensor, hidden=None, mask: torch.Tensor | None = None, hooks=None) -> Trace:
    """All gates, cells and hidden states of ``model`` on ``ids`` (T, B)."""
    layers = lstm_of(model).num_layers
    features, cache, final = run(model, ids, hidden, mask, hooks, _names(layers))
    stacked = {k: torch.stack([cache[f"L{n}.{k}"] for n in range(1, layers + 1)]) for k in KINDS}
    return Trace(**stacked, features=features, hidden=final)
