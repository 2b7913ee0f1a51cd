"""Figures of the reproduction (matplotlib, PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def table2_bars(agg: dict, paper: dict, path, methods=None) -> Path:
    """Normalised average per method: ours (mean ± std over seeds) beside the paper's."""
    methods = [m for m in (methods or agg["methods"]) if m in agg["methods"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(methods) + 2), 4))
    x = range(len(methods))
    w = 0.4
    ours = [agg["methods"][m]["average"] for m in methods]
    ax.bar([i - w / 2 for i in x], [o["mean"] for o in ours], w, yerr=[o["std"] for o in ours],
           capsize=3, label=f"this run ({agg['seeds']} seed(s))")
    pv = [paper.get(m, {}).get("average") for m in methods]
    ax.bar([i + w / 2 for i in x], [p[0] if p else 0 for p in pv], w,
           yerr=[p[1] if p else 0 for p in pv], capsize=3, label="paper (Table 2)", alpha=0.7)
    values = [o["mean"] - o["std"] for o in ours] + [p[0] - p[1] for p in pv if p]
    ax.set_ylim(bottom=max(0.0, min(values) - 10) if values else 0.0)
    for i, p in enumerate(pv):
        if p is None:
            ax.text(i + w / 2, ax.get_ylim()[0], "n/a", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x))
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_ylabel("normalised average score")
    ax.set_title("Table 2 (CLM): normalised average")
    ax.legend(fontsize=8)
    return _save(fig, path)


def sweep(curves: dict, path, xlabel: str, title: str, logx=False, references: dict | None = None,
          xticklabels: dict | None = None) -> Path:
    """curves: {label: {x: {"mean", "std"}}}; references: {label: y} drawn as lines.
    Non-numeric x (e.g. "all") is placed at the right end."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    all_x = list(dict.fromkeys(x for pts in curves.values() for x in pts))
    numeric = sorted(x for x in all_x if isinstance(x, (int, float)))
    extra = [x for x in all_x if not isinstance(x, (int, float))]
    pos = {x: x for x in numeric}
    if extra:
        top = max(numeric) if numeric else 1
        for j, x in enumerate(extra):
            pos[x] = top * (4 ** (j + 1)) if logx else top + j + 1
    for label, pts in curves.items():
        xs = [x for x in numeric + extra if x in pts]
        ax.errorbar([pos[x] for x in xs], [pts[x]["mean"] for x in xs], yerr=[pts[x]["std"] for x in xs],
                    marker="o", capsize=3, label=label)
    for label, y in (references or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="grey")
        ax.annotate(label, xy=(0.01, y), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    if logx:
        ax.set_xscale("log")
    ticks = numeric + extra
    ax.set_xticks([pos[x] for x in ticks])
    ax.set_xticklabels([(xticklabels or {}).get(x, f"{x:g}" if isinstance(x, (int, float)) else str(x))
                        for x in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("normalised average score")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def routing_heatmaps(shares: dict, domains, path) -> Path:
    """shares: {method: {domain: [layer][expert] share}}: a domain × expert heatmap per method and layer."""
    methods = [m for m in shares if shares[m]]
    layers = max(len(next(iter(shares[m].values()))) for m in methods)
    fig, axes = plt.subplots(len(methods), layers, figsize=(2.2 * layers + 1, 2.2 * len(methods) + 0.5),
                             squeeze=False)
    im = None
    for r, m in enumerate(methods):
        for layer in range(layers):
            ax = axes[r][layer]
            grid = [shares[m][d][layer] for d in domains]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(domains)))
            ax.set_yticks(range(len(domains)))
            ax.set_xticklabels(domains if r == len(methods) - 1 else [], rotation=90, fontsize=7)
            ax.set_yticklabels(domains if layer == 0 else [], fontsize=7)
            if r == 0:
                ax.set_title(f"layer {layer}", fontsize=8)
            if layer == 0:
                ax.set_ylabel(f"{m}\ndomain", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="share of tokens to expert")
    fig.suptitle("Routing: share of each domain's test tokens sent to each expert (top-1)", fontsize=9)
    return _save(fig, path)
