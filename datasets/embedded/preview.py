"""A PNG montage of the embedded set: one row per modality, train and test slices,
lesion outlines in red (docs/img/embedded-preview.png)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datasets.format import SliceSet


def pick_examples(data: SliceSet, n_train: int = 3, n_test: int = 5) -> list[int]:
    """A few train slices spread over z and one test slice per size class (largest first)."""
    table = data.table
    train = table.index[table["split"] == "train"].to_numpy()
    # stable: ties in z keep table order (the default introsort may order them per CPU)
    train = train[np.argsort(table.loc[train, "slice_index"].to_numpy(), kind="stable")]
    chosen = list(train[np.linspace(0, len(train) - 1, n_train).round().astype(int)]) if len(train) else []
    test = table[table["split"] == "test"]
    if "size_class" in test:
        for _, group in test.groupby("size_class", sort=False):
            chosen.append(int(group.index[0]))
    else:
        chosen.extend(test.index[:n_test])
    return [int(i) for i in chosen[: n_train + n_test]]


def save_preview(data: SliceSet, path: str | Path, indices: list[int] | None = None) -> Path:
    """Write the montage; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    indices = pick_examples(data) if indices is None else indices
    rows, cols = len(data.modalities), len(indices)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.3), squeeze=False)
    for j, i in enumerate(indices):
        row = data.table.iloc[i]
        mask = np.asarray(data.lesion_masks[i])
        for c, name in enumerate(data.modalities):
            ax = axes[c, j]
            ax.imshow(np.asarray(data.images[i, c]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if mask.any():
                ax.contour(mask, levels=[0.5], colors="red", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
        title = f"{row['split']} z={int(row['slice_index'])}"
        if row["split"] == "test":
            title += f"\n{int(row['lesion_area'])} px"
        axes[0, j].set_title(title, fontsize=7)
    fig.tight_layout(pad=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
