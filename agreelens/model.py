"""Word-level LSTM language model of Gulordava et al. (2018).

Embedding -> dropout -> n-layer LSTM -> dropout -> decoder (untied). The decoder is the paper's linear
layer + softmax (``softmax: full``) or torch's adaptive softmax (``softmax: adaptive``; Grave et al.
2017), which makes CPU training several times faster on a large vocabulary. Tensors are time-major,
``(T, B)``, as in pytorch/examples word_language_model.

A saved model is a directory: ``model.safetensors`` (tensors only), ``config.json`` (architecture)
and ``vocab.txt``. It is never a pickled module.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from agreelens.config import ModelConfig
from agreelens.files import check_readable, publish_tree
from agreelens.vocab import Vocab

Hidden = tuple[torch.Tensor, torch.Tensor]


class RNNModel(nn.Module):
    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.Embedding(vocab_size, cfg.emb_size)
        self.rnn = nn.LSTM(
            cfg.emb_size, cfg.hidden_size, cfg.layers, dropout=cfg.dropout if cfg.layers > 1 else 0.0
        )
        if cfg.softmax == "adaptive":
            cutoffs = [c for c in cfg.cutoffs if 0 < c < vocab_size - 1]
            if not cutoffs:
                raise ValueError(f"model.cutoffs {cfg.cutoffs} leave no tail for a vocabulary of {vocab_size}")
            self.decoder = nn.AdaptiveLogSoftmaxWithLoss(
                cfg.hidden_size, vocab_size, cutoffs=cutoffs, div_value=cfg.div_value
            )
        else:
            self.decoder = nn.Linear(cfg.hidden_size, vocab_size)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        if isinstance(self.decoder, nn.Linear):
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)
        if self.cfg.lstm_bias is not None:  # after the weights' draws: the weights are those of torch's init
            with torch.no_grad():
                for layer in range(self.cfg.layers):
                    getattr(self.rnn, f"bias_ih_l{layer}").fill_(self.cfg.lstm_bias / 2)
                    getattr(self.rnn, f"bias_hh_l{layer}").fill_(self.cfg.lstm_bias / 2)

    def init_hidden(self, batch_size: int) -> Hidden:
        w = next(self.parameters())
        shape = (self.cfg.layers, batch_size, self.cfg.hidden_size)
        return w.new_zeros(shape), w.new_zeros(shape)

    def forward(self, input: torch.Tensor, hidden: Hidden | None = None) -> tuple[torch.Tensor, Hidden]:
        """``input`` (T, B) word ids -> top-layer features (T, B, H) and the final (h, c)."""
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        return self.drop(output), hidden

    def _adaptive(self, method: str, flat: torch.Tensor, *args):
        """Call the adaptive softmax; under CUDA autocast it runs in fp32 (torch's implementation
        index-copies fp32 log-probs into a tensor of the input's low-precision dtype and fails)."""
        fn = getattr(self.decoder, method)
        if flat.is_cuda and torch.is_autocast_enabled("cuda"):
            with torch.autocast("cuda", enabled=False):
                return fn(flat.float(), *args)
        return fn(flat, *args)

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of ``targets`` given features of the same leading shape."""
        flat = features.reshape(-1, features.size(-1))
        if isinstance(self.decoder, nn.AdaptiveLogSoftmaxWithLoss):
            return self._adaptive("forward", flat, targets.reshape(-1)).loss
        return F.cross_entropy(self.decoder(flat).float(), targets.reshape(-1))

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log P(target | context) for each position; only the needed probabilities are computed
        where the decoder allows it (adaptive softmax: the head plus the target's own cluster)."""
        shape = targets.shape
        flat = features.reshape(-1, features.size(-1))
        if isinstance(self.decoder, nn.AdaptiveLogSoftmaxWithLoss):
            return self._adaptive("forward", flat, targets.reshape(-1)).output.reshape(shape)
        logp = F.log_softmax(self.decoder(flat).float(), dim=-1)
        return logp.gather(1, targets.reshape(-1, 1)).reshape(shape)

    def target_margin(self, features: torch.Tensor, good: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        """log P(good | context) - log P(bad | context) for features (N, H) and word ids (N,).

        Both words share the context, so the softmax normalisers cancel: with a full softmax the margin
        is the difference of two logits; with an adaptive softmax, of two head logits (both words in
        the head) or of two logits of one tail cluster. Only rows whose words sit in different clusters
        pay for the normalisers (``target_log_probs``).

        Weight rows are taken with ``index_select``: the backward of ``w[ids]`` accumulates repeated ids
        with atomic adds on a multi-threaded CPU, so training would not be reproducible run to run.
        """
        features, good, bad = features.float(), good.contiguous(), bad.contiguous()

        def diff(t: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, g) - t.index_select(0, b)

        if isinstance(self.decoder, nn.Linear):
            w, b = self.decoder.weight, self.decoder.bias
            return (diff(w, good, bad) * features).sum(-1) + diff(b, good, bad)
        dec = self.decoder
        edges = torch.tensor([0, *dec.cutoffs], device=good.device)
        cg = torch.bucketize(good, edges, right=True) - 1  # 0 = head, i = tail cluster i
        cb = torch.bucketize(bad, edges, right=True) - 1
        out = torch.empty(good.shape, dtype=features.dtype, device=features.device)
        head = (cg == 0) & (cb == 0)
        if head.any():
            w = dec.head.weight
            out[head] = (diff(w, good[head], bad[head]) * features[head]).sum(-1)
            if dec.head.bias is not None:
                out[head] += diff(dec.head.bias, good[head], bad[head])
        rest = ~head
        for i in range(1, len(dec.cutoffs)):
            rows = (cg == i) & (cb == i)
            if rows.any():
                proj, lin = dec.tail[i - 1][0], dec.tail[i - 1][1]
                z = proj(features[rows])
                g, b_ = good[rows] - dec.cutoffs[i - 1], bad[rows] - dec.cutoffs[i - 1]
                out[rows] = (diff(lin.weight, g, b_) * z).sum(-1)
                rest &= ~rows
        if rest.any():
            with torch.autocast(features.device.type, enabled=False):  # fp32 rows into an fp32 output
                lp = self.target_log_probs(features[rest].unsqueeze(1).expand(-1, 2, -1),
                                           torch.stack([good[rest], bad[rest]], 1))
            out[rest] = lp[:, 0] - lp[:, 1]
        return out

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Full next-word log-distribution, (..., V)."""
        flat = features.reshape(-1, features.size(-1))
        if isinstance(self.decoder, nn.AdaptiveLogSoftmaxWithLoss):
            out = self._adaptive("log_prob", flat)
        else:
            out = F.log_softmax(self.decoder(flat).float(), dim=-1)
        return out.reshape(*features.shape[:-1], -1)


def save_model(model: RNNModel, vocab: Vocab, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write the model directory atomically (a crash never leaves a half-written model) and world-readable
    (0755 directory, 0644 files, whatever the umask), so a service running as another user can load it."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    old = None
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        meta = {"vocab_size": model.vocab_size, "model": model.cfg.model_dump(), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        vocab.save(tmp / "vocab.txt")
        publish_tree(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "model")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


MODEL_FILES = ("model.safetensors", "config.json", "vocab.txt")


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[RNNModel, Vocab]:
    """Load a model directory; a file this process may not read raises PermissionError naming it."""
    model_dir = Path(model_dir)
    if model_dir.is_dir() and not os.access(model_dir, os.X_OK):
        raise PermissionError(f"{model_dir}: permission denied (directory mode "
                              f"{model_dir.stat().st_mode & 0o7777:04o}, owner uid {model_dir.stat().st_uid}; "
                              f"this process runs as uid {os.getuid()}): chmod -R a+rX {model_dir}")
    for name in MODEL_FILES:
        if not (model_dir / name).is_file():
            raise FileNotFoundError(
                f"{model_dir}: not a model directory (missing {name}); train one with "
                "`agreelens train --model small` or `dvc repro`"
            )
    for name in MODEL_FILES:  # safetensors reports an unreadable file as "No such file or directory"
        check_readable(model_dir / name)
    meta = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    vocab = Vocab.load(model_dir / "vocab.txt")
    model = RNNModel(meta["vocab_size"], ModelConfig(**meta["model"]))
    try:
        state = load_file(str(model_dir / "model.safetensors"), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors' own errors do not name the file
        raise ValueError(f"{model_dir / 'model.safetensors'}: cannot be read as safetensors "
                         f"({type(err).__name__}: {err}); save the model again") from err
    model.load_state_dict(state)
    return model.to(device).eval(), vocab


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode under ``torch.inference_mode()``; the model's training
    mode is restored afterwards, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)
