"""A retrain's report inside its model version: report.json and PNG plots.

- `report.json`: the gate decision, holdout metrics of the new and the live model, loss per iteration,
  timings, and the metrics of earlier versions;
- `loss.png`: the Hu loss per iteration of the published model's training;
- `metrics.png`: P@10, NDCG@10 and MPR of every version in the store so far and of this one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def history(store: Any) -> list[dict[str, Any]]:
    """(version, holdout metrics) of the store's published versions, oldest first; unevaluated ones left out."""
    out = []
    for version in store.versions():
        try:
            metrics = (store.read_manifest(version).get("metrics") or {}).get("model")
        except Exception:  # a damaged manifest: the report simply leaves that version out
            continue
        if metrics:
            out.append({"version": version, **metrics})
    return out


def write_report(directory: Path, body: dict[str, Any], losses: list[float], past: list[dict[str, Any]]) -> dict:
    """Write report.json, loss.png and metrics.png into `directory`; returns manifest fields."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (directory / "report.json").write_text(json.dumps({**body, "history": past}, indent=2, default=float), "utf-8")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if losses:
        ax.plot(np.arange(1, len(losses) + 1), losses, marker="o")
    ax.set_xlabel("iteration")
    ax.set_ylabel("Hu loss (normalised)")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(directory / "loss.png", dpi=100)
    plt.close(fig)
    new = body.get("new") or {}
    rows = [*past, {"version": "this", **new}] if new else past
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    labels = [r["version"][:15] for r in rows]
    for ax, (key, title) in zip(axes, (("precision", "P@10"), ("ndcg", "NDCG@10"), ("mpr", "MPR (lower is better)"))):
        ax.plot(range(len(rows)), [r.get(key, np.nan) for r in rows], marker="o")
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(directory / "metrics.png", dpi=100)
    plt.close(fig)
    return {"report": {"files": ["report.json", "loss.png", "metrics.png"], "gate": body.get("gate")}}
