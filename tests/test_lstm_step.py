"""The LSTM cell update: ``agreelens.trace.lstm_step`` equals ``torch.nn.LSTM`` on random weights and
inputs, with and without a previous cell, writing into given tensors or not; and it is the package's
only implementation of the gate nonlinearities."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from agreelens.trace import lstm_step

PACKAGE = Path(__file__).resolve().parents[1] / "agreelens"
IN, H, B = 5, 7, 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def lstm_and_inputs(seed: int):
    """A one-layer float64 nn.LSTM with random weights and biases, an input (B, IN), h0 and c0 (B, H)."""
    g = torch.Generator().manual_seed(seed)
    rnn = torch.nn.LSTM(IN, H, 1).double()
    with torch.no_grad():
        for p in rnn.parameters():
            p.copy_(torch.empty(p.shape, dtype=p.dtype).uniform_(-2, 2, generator=g))
    x = torch.randn(B, IN, dtype=torch.float64, generator=g)
    h0 = torch.randn(B, H, dtype=torch.float64, generator=g)
    c0 = torch.randn(B, H, dtype=torch.float64, generator=g)
    return rnn, x, h0, c0


def pre_activations(rnn, x, h0):
    return x @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h0 @ rnn.weight_hh_l0.T + rnn.bias_hh_l0


@pytest.mark.parametrize("seed", [0, 1, 2])
@torch.no_grad()
def test_step_equals_nn_lstm(seed):
    rnn, x, h0, c0 = lstm_and_inputs(seed)
    _, (h_ref, c_ref) = rnn(x.unsqueeze(0), (h0.unsqueeze(0), c0.unsqueeze(0)))
    i, f, g, o, c, h = lstm_step(pre_activations(rnn, x, h0), c0)
    torch.testing.assert_close(c, c_ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(h, h_ref[0], rtol=0, atol=1e-12)
    assert all(t.shape == (B, H) for t in (i, f, g, o))
    assert bool(((i > 0) & (i < 1) & (f > 0) & (f < 1) & (o > 0) & (o < 1)).all())
    assert bool((g.abs() < 1).all())


@torch.no_grad()
def test_step_from_zero_state_equals_nn_lstm():
    rnn, x, _, _ = lstm_and_inputs(3)
    zeros = torch.zeros(B, H, dtype=torch.float64)
    _, (h_ref, c_ref) = rnn(x.unsqueeze(0))  # nn.LSTM's default state: zeros
    *_, c, h = lstm_step(pre_activations(rnn, x, zeros), None)
    torch.testing.assert_close(c, c_ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(h, h_ref[0], rtol=0, atol=1e-12)


@torch.no_grad()
def test_step_writes_into_out_and_takes_leading_dimensions():
    rnn, x, h0, c0 = lstm_and_inputs(4)
    gates = pre_activations(rnn, x, h0)
    *_, c_ref, h_ref = lstm_step(gates.clone(), c0)
    c_out, h_out = torch.empty(2, 2, H, dtype=torch.float64), torch.empty(2, 2, H, dtype=torch.float64)
    *_, c, h = lstm_step(gates.clone().view(2, 2, -1), c0.view(2, 2, -1), out=(c_out, h_out))
    assert c.data_ptr() == c_out.data_ptr() and h.data_ptr() == h_out.data_ptr()
    assert torch.equal(c_out.view(B, H), c_ref) and torch.equal(h_out.view(B, H), h_ref)


@torch.no_grad()
def test_patch_replaces_activations():
    rnn, x, h0, c0 = lstm_and_inputs(5)
    gates = pre_activations(rnn, x, h0)
    seen = []

    def patch(kind, value):
        seen.append(kind)
        return torch.zeros_like(value) if kind == "i" else value

    _, f, g, o, c, h = lstm_step(gates, c0, patch)
    assert seen == ["i", "f", "g", "o", "c", "h"]
    torch.testing.assert_close(c, f * c0, rtol=0, atol=0)  # input gate closed: the cell only forgets
    torch.testing.assert_close(h, o * torch.tanh(f * c0), rtol=0, atol=1e-15)


GATE_OPS = {"tanh", "tanh_", "sigmoid_", "addcmul", "addcmul_"}


def gate_maths_sites() -> set[str]:
    """``module.function`` of every function (innermost; ``module.<module>`` for top-level code) in the
    package that calls a gate nonlinearity or cell-update op, or splits a tensor into four gates."""
    sites: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def __init__(self, module: str):
            self.stack = [f"{module}.<module>"]

        def visit_FunctionDef(self, node):
            self.stack.append(f"{self.stack[0].split('.')[0]}.{node.name}")
            self.generic_visit(node)
            self.stack.pop()

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Call(self, node):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            four = any(isinstance(a, ast.Constant) and a.value == 4 for a in node.args[:1])
            if name in GATE_OPS or (name == "chunk" and four):
                sites.add(self.stack[-1])
            self.generic_visit(node)

    for path in sorted(PACKAGE.glob("*.py")):
        Visitor(path.stem).visit(ast.parse(path.read_text(encoding="utf-8")))
    return sites


def test_gate_maths_has_one_implementation():
    assert gate_maths_sites() == {"trace.lstm_step"}
