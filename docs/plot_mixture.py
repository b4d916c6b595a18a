"""Plot per-source validation curves of a mixture-weight sweep (README, Data mixtures):

    llm-train -m experiment=mixture_weights logger=none
    python docs/plot_mixture.py runs/multirun/<stamp> docs/img/mixture_val_loss.png

One panel per source (val/loss/<source> against training tokens), one line per run, labelled by
each source's share of the training tokens (summary.json's `mixture`); the Markov chain's panel
also shows its entropy rate, the loss no model can beat.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llm.tracking.metrics import read_metrics  # noqa: E402


def chain_floor() -> float:
    """-log P(next | previous) under the preset's Markov chain (data=synthetic's defaults), averaged
    over the symbols that validation scores: the first val_batches x micro_batch_size x seq_len
    tokens of the val split. Its entropy rate (0.311 nats) is the floor in expectation; 4,096 tokens
    of two long documents are too few to be typical, so this is the floor for the plotted curve."""
    import numpy as np

    from llm.data import SyntheticCorpus

    chain = SyntheticCorpus()
    index = {c: i for i, c in enumerate(chain.symbols)}
    n = 8 * 8 * 64  # val_batches x micro_batch_size x seq_len of experiment=mixture_weights
    stream = "\n".join(chain.documents("val"))[: n + 1]  # "\n": the EOS between documents, not scored here
    pairs = [(index[a], index[b]) for a, b in zip(stream, stream[1:]) if a in index and b in index]
    return float(np.mean([-np.log(chain.transition_matrix[a, b]) for a, b in pairs]))


def main(sweep: Path, out: Path) -> None:
    runs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    sources = list(summaries[0]["mixture"])
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 3.8), sharex=True)
    for run, summary in sorted(zip(runs, summaries), key=lambda rs: rs[1]["mixture"][sources[0]]["weight"]):
        tokens_per_step = summary["D"] / summary["steps_done"]
        records = read_metrics(run / "metrics.jsonl")
        shares = ", ".join(f"{s} {summary['mixture'][s]['weight']:.0%}" for s in sources)
        for ax, source in zip(axes, sources):
            points = [(r["step"] * tokens_per_step, r[f"val/loss/{source}"]) for r in records if f"val/loss/{source}" in r]
            ax.plot(*zip(*points), marker="o", markersize=3,
                    label=f"{shares} ({summary[f'data/epochs/{source}']:.2f} epochs)")
    for ax, source in zip(axes, sources):
        ax.set_title(f"val/loss/{source}")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if "markov" in sources:
        floor = chain_floor()
        ax = axes[sources.index("markov")]
        ax.axhline(floor, color="gray", linestyle="--", linewidth=1)
        ax.annotate(f"the chain's own loss on these val blocks: {floor:.3f}", (0.98, floor),
                    xycoords=("axes fraction", "data"), xytext=(0, -3), textcoords="offset points", ha="right",
                    va="top", fontsize=7, color="gray")
        ax.set_ylim(bottom=floor - 0.06)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
