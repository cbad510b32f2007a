"""Figures of the units: the paper's Figures 2-3 (a unit's cell state and gates over the words of nounpp
sentences, four conditions) and Karpathy et al. (2015) gate saturation. Activations come from
:mod:`agreelens.trace` (exact, from the trained ``nn.LSTM`` weights, eval mode).

Conditions keep the paper's convention: colour = subject number (singular blue, plural red), line
style = attractor (same number as the subject: solid; different: dashed).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from agreelens.model import device_of, evaluating  # noqa: E402
from agreelens.plots import save_figure  # noqa: E402
from agreelens.text import tokenize  # noqa: E402
from agreelens.trace import trace, unit_to_layer_index  # noqa: E402
from agreelens.vocab import Vocab  # noqa: E402

STYLE = {"SS": ("tab:blue", "-"), "SP": ("tab:blue", "--"), "PS": ("tab:red", "--"), "PP": ("tab:red", "-")}
PANELS = (("c", "cell state $c_t$"), ("h", "hidden state $h_t$"), ("i", "input gate $i_t$"), ("f", "forget gate $f_t$"))
GATES = ("i", "f", "o")
GATE_NAMES = {"i": "input gate", "f": "forget gate", "o": "output gate"}


def unit_dynamics(model, vocab: Vocab, pairs: list[dict], units: list[int]) -> dict:
    """Mean c, h, i, f of each unit at every word of the nounpp sentences, per condition.

    ``pairs``: nounpp stimuli (sentence_good, condition). Sentences are traced whole (the correct verb
    included), primed with ``<eos>`` as in training. Returns ``{"words": [...], "units": {unit:
    {condition: {kind: [mean per word]}}}, "n": {condition: count}}``.
    """
    rnn = model.rnn
    by_cond: dict[str, list[list[int]]] = {}
    words: list[str] | None = None
    for p in pairs:
        toks = tokenize(p["sentence_good"])
        if words is None:
            words = toks
        by_cond.setdefault(p["condition"], []).append([vocab.eos, *vocab.encode(toks)])
    if not by_cond:
        raise ValueError("no nounpp sentences to trace: generate them with `agreelens stimuli`")
    lengths = {len(s) for seqs in by_cond.values() for s in seqs}
    if len(lengths) != 1:
        raise ValueError(f"nounpp sentences must share one template length, got lengths {sorted(lengths)}")
    device = device_of(model)
    out: dict = {"words": words, "units": {u: {} for u in units}, "n": {}}
    with evaluating(model):
        for cond in sorted(by_cond, key=list(STYLE).index):
            ids = torch.tensor(by_cond[cond], device=device).t()  # (T, B)
            tr = trace(model, ids)
            out["n"][cond] = ids.size(1)
            for u in units:
                layer, idx = unit_to_layer_index(u, rnn.hidden_size, rnn.num_layers)
                # position 0 is the <eos> primer: keep the words only
                out["units"][u][cond] = {k: getattr(tr, k)[layer - 1, 1:, :, idx].float().mean(1).tolist()
                                         for k, _ in PANELS}
    return out


def plot_unit_dynamics(dyn: dict, path: str | Path, title: str = "") -> Path:
    """One row per unit, columns c, h, input gate, forget gate (the paper's Figures 2-3)."""
    units = list(dyn["units"])
    fig, axes = plt.subplots(len(units), len(PANELS), figsize=(3.4 * len(PANELS), 2.6 * len(units)),
                             squeeze=False, sharex=True)
    x = list(range(len(dyn["words"])))
    for r, u in enumerate(units):
        for col, (kind, label) in enumerate(PANELS):
            ax = axes[r][col]
            for cond, series in dyn["units"][u].items():
                color, ls = STYLE[cond]
                ax.plot(x, series[kind], color=color, ls=ls, marker="o", ms=3, lw=1.6, label=cond)
            ax.set_title(f"unit {u}: {label}", fontsize=9)
            if kind in ("i", "f"):
                ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            ax.set_xticks(x)
            ax.set_xticklabels(dyn["words"], rotation=45, ha="right", fontsize=8)
    axes[0][0].legend(fontsize=8, title="condition", title_fontsize=8)
    return save_figure(fig, path, title)


def gate_saturation(model, ids: torch.Tensor, low: float = 0.1, high: float = 0.9,
                    bptt: int = 35) -> dict[str, torch.Tensor]:
    """Karpathy et al. (2015): per gate, layer and unit, the fraction of time steps the gate is
    left-saturated (< ``low``) and right-saturated (> ``high``) on a (T, B) stream, run in ``bptt``
    chunks with the state carried over. Returns ``{"i": (2, layers, H), ...}`` (row 0 left, 1 right)."""
    device = device_of(model)
    rnn = model.rnn
    with evaluating(model):
        counts = {g: torch.zeros(2, rnn.num_layers, rnn.hidden_size, dtype=torch.float64) for g in GATES}
        total, hidden = 0, None
        for start in range(0, ids.size(0), bptt):
            chunk = ids[start : start + bptt].to(device)
            tr = trace(model, chunk, hidden)
            hidden = tr.hidden
            for g in GATES:
                v = getattr(tr, g).float()  # (layers, T, B, H)
                counts[g][0] += (v < low).sum((1, 2)).double().cpu()
                counts[g][1] += (v > high).sum((1, 2)).double().cpu()
            total += chunk.numel()
        return {g: (c / max(total, 1)).float() for g, c in counts.items()}


def plot_gate_saturation(sat: dict[str, torch.Tensor], path: str | Path, highlight: list[int] | None = None,
                         title: str = "") -> Path:
    """Grid of layers x gates; one dot per unit at (fraction left-saturated, fraction right-saturated)."""
    layers, hsz = sat["i"].shape[1], sat["i"].shape[2]
    fig, axes = plt.subplots(layers, len(GATES), figsize=(3.3 * len(GATES), 3.2 * layers), squeeze=False)
    marked = {unit_to_layer_index(u, hsz, layers) for u in highlight or []}
    for layer in range(layers):
        for col, g in enumerate(GATES):
            ax = axes[layer][col]
            left, right = sat[g][0, layer], sat[g][1, layer]
            ax.scatter(left, right, s=6, alpha=0.5, color="tab:gray" if layer else "tab:green", lw=0)
            for lay, idx in marked:
                if lay == layer + 1:
                    ax.scatter([left[idx]], [right[idx]], s=40, color="tab:red", zorder=3)
                    ax.annotate(str(layer * hsz + idx + 1), (left[idx], right[idx]), fontsize=8,
                                xytext=(3, 3), textcoords="offset points", color="tab:red")
            ax.plot([0, 1], [1, 0], color="black", lw=0.6, ls=":")
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"layer {layer + 1} {GATE_NAMES[g]}", fontsize=9)
            ax.set_xlabel("fraction left-saturated (< 0.1)", fontsize=8)
            ax.set_ylabel("fraction right-saturated (> 0.9)", fontsize=8)
            ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


# ---------------------------------------------------------------------------------------- stages


def chosen_units(params, sweep_result: dict) -> list[int]:
    """The sweep's ``analysis.top_units`` strongest number units, then ``analysis.units`` (deduplicated)."""
    top = [u["unit"] for u in sweep_result.get("number_units", [])][: params.analysis.top_units]
    if len(top) < params.analysis.top_units:  # no unit crossed the threshold: take the largest drops
        ranked = sorted(sweep_result["drops"], key=lambda u: -max(sweep_result["drops"][u]))
        top += [int(u) for u in ranked if int(u) not in top][: params.analysis.top_units - len(top)]
    return list(dict.fromkeys([*top, *params.analysis.units]))


def run_units(params, name: str, stimuli_dir: str | Path = "stimuli", metrics: str | Path = "metrics",
              figures: str | Path = "reports/figures") -> dict:
    """Stage ``units``: Table 7 for the chosen units (``metrics/table7_<name>.json``), their dynamics
    over nounpp sentences (``reports/figures/units_<name>.png``) and gate saturation on validation text
    (``reports/figures/saturation_<name>.png``). Needs the sweep's ``metrics/units_<name>.json``."""
    import json

    from agreelens.ablation import ablate, load_stimuli
    from agreelens.corpus import read_split
    from agreelens.model import default_device, load_model
    from agreelens.na import resolve_model
    from agreelens.trace import parse_units
    from agreelens.train import batchify

    metrics, figures, tag = Path(metrics), Path(figures), Path(name).name
    sweep_path = metrics / f"units_{tag}.json"
    if not sweep_path.is_file():
        raise FileNotFoundError(f"{sweep_path}: no sweep yet; run `agreelens sweep --model {name}` first")
    model, vocab = load_model(resolve_model(name), default_device())
    units = parse_units(chosen_units(params, json.loads(sweep_path.read_text())),
                        model.rnn.hidden_size, model.rnn.num_layers)
    pairs = load_stimuli(stimuli_dir)
    t7 = {"model": tag, **ablate(model, vocab, pairs, units, threshold=params.analysis.threshold)}
    (metrics / f"table7_{tag}.json").write_text(json.dumps(t7, indent=1) + "\n")
    nounpp = [p for p in pairs if p.get("construction") == "nounpp"]
    dyn = unit_dynamics(model, vocab, nounpp, units)
    plot_unit_dynamics(dyn, figures / f"units_{tag}.png",
                       title=f"{tag}: units over nounpp sentences (mean of {sum(dyn['n'].values())} sentences)")
    lines = read_split(Path(params.prepare.out) / "valid.txt")
    ids = vocab.encode_lines(lines)[: params.analysis.saturation_tokens]
    sat = gate_saturation(model, batchify(ids, 16))
    plot_gate_saturation(sat, figures / f"saturation_{tag}.png", highlight=units,
                         title=f"{tag}: gate saturation on {ids.numel():,} validation tokens (red: chosen units)")
    return {"units": units, "table7": t7, "dynamics": dyn}
