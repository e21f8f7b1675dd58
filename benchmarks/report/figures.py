"""Seaborn/matplotlib figures of the leaderboard: bar charts per table and anomaly-map grids."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .published import FLOOR_MARK, is_floor
from .tables import Cell, Table

_NONE = Cell()  # stands in for a missing cell

_PNG_METADATA = {"Software": None}  # keep PNG bytes independent of the matplotlib version


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def bar_chart(table: Table, title: str, path: Path) -> Path | None:
    """Bars = mean over seeds per (column, row), error bars = std over seeds; published as ◇."""
    long = pd.DataFrame(
        [{"column": c, "row": r.label, "value": v} for r in table.rows for c in table.columns for v in r.cells.get(c, _NONE).values.values()]
    )
    if long.empty:
        return None
    import seaborn as sns

    plt = _pyplot()
    hue_order = [r.label for r in table.rows if any(r.cells.get(c, _NONE).n for c in table.columns)]
    # one distinct colour per row: the colour-blind palette has 10, more rows (ablation variants) get husl
    palette = sns.color_palette("colorblind" if len(hue_order) <= 10 else "husl", len(hue_order))
    width = max(6.0, 1.6 + len(table.columns) * (0.9 + 0.22 * len(hue_order)))
    with sns.axes_style("whitegrid"):
        fig, ax = plt.subplots(figsize=(width, 4.0))
        sns.barplot(
            data=long, x="column", y="value", hue="row", order=table.columns, hue_order=hue_order,
            errorbar="sd", capsize=0.15, err_kws={"linewidth": 1.0}, palette=palette, ax=ax,
        )
        marked = _mark_published(ax, table, hue_order)
        floor = _draw_floor(ax, table)
        ax.set_xlabel("")
        ax.set_ylabel("Max Dice (%)")
        ax.set_ylim(0, max(100.0, float(long["value"].max()) * 1.05))
        ax.set_title(_wrap(title, int(width * 9)), fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        if floor is not None:
            handles.append(floor)
            labels.append(f"{FLOOR_MARK}: to beat")
        if marked:
            handles.append(ax.scatter([], [], marker="D", facecolors="none", edgecolors="black", s=26))
            labels.append(table.published_caption.replace(" (", "\n(") + f"\n{table.published_short}")
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, metadata=_PNG_METADATA)
        plt.close(fig)
    return path


def _wrap(title: str, width: int) -> str:
    return "\n".join(textwrap.fill(line, width) for line in title.splitlines())


def _draw_floor(ax, table: Table):
    """A dashed line across each column group at the untrained floor's mean; its handle, or None."""
    rows = [r for r in table.rows if is_floor(r.method) and r.variant == "default"]
    if not rows:
        return None
    line = None
    for i, column in enumerate(table.columns):
        cell = rows[0].cells.get(column, _NONE)
        if cell.n:
            line = ax.hlines(cell.mean, i - 0.48, i + 0.48, colors="black", linestyles="--", linewidth=1.0, zorder=6)
    return line


def _mark_published(ax, table: Table, hue_order: list[str]) -> bool:
    """Draw the published value on top of the matching bar; True if any was drawn."""
    rows = {r.label: r for r in table.rows}
    drawn = False
    bars = [c for c in ax.containers if hasattr(c, "patches")]
    for container, label in zip(bars, hue_order):  # seaborn adds one container per hue level, in order
        row = rows[label]
        for patch in container.patches:
            if math.isnan(patch.get_height()):
                continue
            centre = patch.get_x() + patch.get_width() / 2
            column = table.columns[int(round(centre))]
            value = row.published.get(column)
            if value is not None:
                ax.scatter([centre], [value], marker="D", facecolors="none", edgecolors="black", s=26, zorder=5)
                drawn = True
    return drawn


@dataclass
class MapEntry:
    label: str  # row label (method)
    path: Path  # the record's examples .npz
    modality: str
    threshold: float | None = None  # the record's Max Dice threshold, for the prediction panel
    strict: bool = False  # prediction = map > threshold (peer grids) instead of map >= threshold
    brain_masked: bool = False  # the protocol multiplied maps by the brain mask before thresholding

    def prediction(self, amap: np.ndarray, brain: np.ndarray | None) -> np.ndarray | None:
        """The pixels the evaluator flagged at the Max Dice threshold, as the protocol computed them."""
        if self.threshold is None or not math.isfinite(self.threshold):
            return None
        values = amap * (brain > 0) if self.brain_masked and brain is not None else amap
        return values > self.threshold if self.strict else values >= self.threshold


def map_grid(entries: list[MapEntry], title: str, path: Path, n_slices: int = 2) -> Path | None:
    """Rows = methods; per shared test slice: image / reconstruction (if any) / map / ground truth."""
    loaded = [(e, _load(e.path)) for e in entries]
    loaded = [(e, a) for e, a in loaded if a is not None]
    if not loaded:
        return None
    picks, shared = _shared_slices([a for _, a in loaded], n_slices)
    if not picks:
        return None
    with_recon = any("reconstruction" in a for _, a in loaded)
    with_pred = any(e.threshold is not None for e, _ in loaded)
    panels = ["image"] + (["reconstruction"] if with_recon else []) + ["anomaly map"] + (["prediction"] if with_pred else []) + ["ground truth"]
    plt = _pyplot()
    n_rows, n_cols = len(loaded), len(panels) * len(picks)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.55 * n_cols + 0.9, 1.6 * n_rows + 0.7), squeeze=False)
    for r, (entry, arrays) in enumerate(loaded):
        for s, key in enumerate(picks):
            k = picks[key][r]
            for p, panel in enumerate(panels):
                ax = axes[r, s * len(panels) + p]
                _draw_panel(ax, panel, arrays, k, entry)
                if r == 0:
                    ax.set_title(f"{_slice_name(key, s, shared)}: {panel}", fontsize=8)
        axes[r, 0].set_ylabel(entry.label, fontsize=9)
    note = "" if shared else " (slices differ between methods)"
    legend = "maps scaled per panel to [0, 99.9th percentile in the brain] (colour bar: map units); cyan: lesion outline"
    if with_pred:
        legend += "\nprediction at the record's Max Dice threshold: yellow = flagged, cyan = lesion outline"
    fig.suptitle(_wrap(f"{title}{note}", int(n_cols * 20)) + "\n" + legend, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata=_PNG_METADATA)
    plt.close(fig)
    return path


def _slice_name(key: object, s: int, shared: bool) -> str:
    return f"test #{key}" if shared and isinstance(key, (int, np.integer)) else f"slice {s + 1}"


def _load(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError):
        return None
    needed = {"image", "map", "lesion_mask"}
    return arrays if needed <= set(arrays) and len(arrays["map"]) else None


def _shared_slices(all_arrays: list[dict[str, np.ndarray]], n: int) -> tuple[dict[object, list[int]], bool]:
    """Pick up to ``n`` test slices every method stored: the largest lesion, then a mid-sized one.

    Slices are matched by their test-set ``index`` when the npz carries it, otherwise by position.
    Returns {slice id: [position in each method's arrays]} and whether the slices are truly shared.
    """
    if all("index" in a for a in all_arrays):
        common = set(all_arrays[0]["index"].tolist())
        for a in all_arrays[1:]:
            common &= set(a["index"].tolist())
        positions = {i: [int(np.flatnonzero(a["index"] == i)[0]) for a in all_arrays] for i in sorted(common)}
        shared = True
    else:
        size = min(len(a["map"]) for a in all_arrays)
        positions = {i: [i] * len(all_arrays) for i in range(size)}
        shared = all(np.array_equal(a["image"][:size], all_arrays[0]["image"][:size]) for a in all_arrays)
    if not positions:
        return {}, shared
    first = all_arrays[0]
    area = {i: int(first["lesion_mask"][pos[0]].sum()) for i, pos in positions.items()}
    ranked = sorted(positions, key=lambda i: (-area[i], str(i)))
    chosen = [ranked[0]]
    lesioned = sorted((i for i in positions if area[i] > 0 and i not in chosen), key=lambda i: (area[i], str(i)))
    if lesioned and n > 1:
        chosen.append(lesioned[len(lesioned) // 2])  # a mid-sized lesion next to the largest
    return {i: positions[i] for i in chosen[:n]}, shared


def _draw_panel(ax, panel: str, arrays: dict[str, np.ndarray], k: int, entry: MapEntry | None = None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    image = _channel(arrays["image"][k])
    lo, hi = _range(image, arrays.get("brain_mask", None), k)
    mask = arrays["lesion_mask"][k] > 0
    if panel == "image":
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
    elif panel == "reconstruction":
        if "reconstruction" not in arrays:
            ax.set_facecolor("#eeeeee")
            ax.text(0.5, 0.5, "no\nreconstruction", ha="center", va="center", fontsize=7, color="#666666", transform=ax.transAxes)
            return
        ax.imshow(_channel(arrays["reconstruction"][k]), cmap="gray", vmin=lo, vmax=hi)
    elif panel == "anomaly map":
        amap = np.asarray(arrays["map"][k], dtype=np.float64)
        brain = arrays.get("brain_mask")
        inside = amap[brain[k] > 0] if brain is not None and brain[k].any() else amap.ravel()
        # 99.9th percentile inside the brain: one hot pixel does not wash out the map,
        # while a small lesion (often < 1 % of the brain) still sets the top of the scale.
        top = float(np.percentile(inside, 99.9)) if np.isfinite(inside).all() else 1.0
        low = min(0.0, float(amap.min()))
        shown = ax.imshow(amap, cmap="inferno", vmin=low, vmax=top if top > low else low + 1.0)
        bar = ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize=5)
        if mask.any():
            ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.5)
    elif panel == "prediction":
        brain = arrays.get("brain_mask")
        flagged = entry.prediction(np.asarray(arrays["map"][k], dtype=np.float64), None if brain is None else brain[k]) if entry else None
        if flagged is None:
            ax.set_facecolor("#eeeeee")
            ax.text(0.5, 0.5, "no\nthreshold", ha="center", va="center", fontsize=7, color="#666666", transform=ax.transAxes)
            return
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
        overlay = np.zeros(flagged.shape + (4,))
        overlay[flagged] = (1.0, 0.85, 0.0, 0.7)
        ax.imshow(overlay)
        if mask.any():
            ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.5)
    else:
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
        overlay = np.zeros(mask.shape + (4,))
        overlay[mask] = (1.0, 0.1, 0.1, 0.6)
        ax.imshow(overlay)


def _channel(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    return image[0] if image.ndim == 3 else image


def _range(image: np.ndarray, brain: np.ndarray | None, k: int) -> tuple[float, float]:
    values = image[brain[k] > 0] if brain is not None and brain[k].any() else image.ravel()
    lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    return float(min(lo, image.min())), float(hi if hi > lo else lo + 1.0)
