"""Figures shared by the stages: learning curves (perplexity and NA accuracy while training)."""

from __future__ import annotations

import csv
from pathlib import Path


def read_curve(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) if v else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


def plot_learning_curves(names: list[str], figure: str | Path, folder: str | Path = "plots",
                         curves: dict[str, Path] | None = None) -> Path:
    """Validation/training perplexity against tokens and time, and NA accuracy when it was logged.
    Each name's curve is ``folder/learning_<name>.csv``, or ``curves[name]`` where given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name in names:
        path = Path((curves or {}).get(name) or Path(folder) / f"learning_{name}.csv")
        if not path.is_file():
            continue
        rows = read_curve(path)
        if not rows:
            continue
        if "na_accuracy" in rows[0]:
            ax[2].plot([r["epoch"] for r in rows], [100 * r["na_accuracy"] for r in rows], marker="o", label=f"{name} all")
            ax[2].plot([r["epoch"] for r in rows], [100 * r["na_nounpp"] for r in rows], ls="--", label=f"{name} nounpp")
        ax[0].plot([r["tokens"] / 1e6 for r in rows], [r["valid_ppl"] for r in rows], marker="o", label=f"{name} valid")
        ax[0].plot([r["tokens"] / 1e6 for r in rows], [r["train_ppl"] for r in rows], ls="--", label=f"{name} train")
        ax[1].plot([r["seconds"] / 60 for r in rows], [r["valid_ppl"] for r in rows], marker="o", label=name)
    ax[0].set(xlabel="tokens seen (M)", ylabel="perplexity", yscale="log", title="Learning curves")
    ax[1].set(xlabel="training time (min)", ylabel="valid perplexity", yscale="log", title="Validation PPL vs time")
    ax[2].axhline(50, color="grey", lw=0.8)
    ax[2].set(xlabel="epoch", ylabel="NA accuracy (%)", ylim=(0, 100), title="Number agreement while training")
    if not ax[2].get_legend_handles_labels()[0]:
        ax[2].text(0.5, 0.5, "no NA accuracy in these curves", ha="center", va="center", transform=ax[2].transAxes)
    for a in ax:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.tight_layout()
    figure = Path(figure)
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    return figure


def save_figure(fig, path, title: str = "", dpi: int = 110) -> Path:
    """Title, tight layout, write ``path`` (folders made), close the figure; returns the path."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
