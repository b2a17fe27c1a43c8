"""The plots in reports/: the loss curve of a run, and the ROC, confusion matrix and P(spam)
histograms of an evaluation. Written under a temporary name, then renamed."""

from __future__ import annotations

from pathlib import Path

from .artifacts import read_jsonl
from .metrics import spam_labels
from .paths import scores_file
from .task import is_spam


def plot_history(history: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([e["iteration"] for e in history["train"]], [e["train_loss"] for e in history["train"]],
            label="train loss")
    ax.plot([e["iteration"] for e in history["val"]], [e["val_loss"] for e in history["val"]],
            "o-", label="validation loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def plot_scores(reports: Path, name: str, threshold: float) -> list[str]:
    """ROC curve, confusion matrix and P(spam) histograms from reports/scores_<name>.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import roc_curve

    rows = read_jsonl(reports / scores_file(name))
    y = spam_labels(rows)
    p = np.array([r["p_spam"] for r in rows])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    fpr, tpr, _ = roc_curve(y, p)
    axes[0].plot(fpr, tpr)
    axes[0].set(xlabel="ham false-positive rate", ylabel="spam recall", title="ROC", xscale="log")
    pred = is_spam(p, threshold)
    cm = np.array([[np.sum(y & pred), np.sum(y & ~pred)], [np.sum(~y & pred), np.sum(~y & ~pred)]])
    axes[1].imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        axes[1].text(j, i, str(v), ha="center", va="center", fontsize=14)
    axes[1].set(xticks=[0, 1], xticklabels=["spam", "ham"], yticks=[0, 1],
                yticklabels=["spam", "ham"], xlabel="verdict", ylabel="truth", title="confusion")
    bins = np.linspace(0, 1, 41)
    axes[2].hist(p[~y], bins=bins, alpha=0.6, label="ham", log=True)
    axes[2].hist(p[y], bins=bins, alpha=0.6, label="spam", log=True)
    axes[2].axvline(threshold, color="k", ls="--", label="threshold")
    axes[2].set(xlabel="P(spam)", title="P(spam) by true label")
    axes[2].legend()
    fig.tight_layout()
    out = reports / f"scores_{name}.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return [out.name]
