"""Regenerate ``datasets/splits/brats21_split.csv`` from IterMask2's published split lists.

The S2 protocol (IterMask2 setting) uses a fixed subject-level split of the 1251 BraTS 2021
training subjects into 990 train / 128 val / 133 test. IterMask2 (Liang et al., MIT
licence) publishes that split as three text files, one subject id per line::

    datasets/brats_split_training.txt    (990 ids)
    datasets/brats_split_validation.txt  (128 ids)
    datasets/brats_split_testing.txt     (133 ids)

in https://github.com/ZiyunLiang/IterMask2 (files last changed in commit
8ab476101a7d59b3b25dc39a1707f2c19409becd). This script turns them into our CSV
(``subject_id,split``, rows sorted by subject id) and checks counts and disjointness::

    python -m datasets.prepare.make_brats21_split --training T.txt --validation V.txt \
        --testing S.txt --out datasets/splits/brats21_split.csv
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

EXPECTED = {"train": 990, "val": 128, "test": 133}
ID_PATTERN = re.compile(r"^BraTS2021_\d{5}$")


def read_ids(path: Path) -> list[str]:
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [i for i in ids if not ID_PATTERN.match(i)]
    if bad:
        raise ValueError(f"{path}: not BraTS 2021 subject ids: {bad[:5]}")
    return ids


def build_split(lists: dict[str, list[str]], check_counts: bool = True) -> pd.DataFrame:
    rows = [(sid, split) for split, ids in lists.items() for sid in ids]
    table = pd.DataFrame(rows, columns=["subject_id", "split"])
    dup = table["subject_id"][table["subject_id"].duplicated()].tolist()
    if dup:
        raise ValueError(f"subject ids in more than one list: {dup[:5]}")
    if check_counts:
        counts = {k: len(v) for k, v in lists.items()}
        if counts != EXPECTED:
            raise ValueError(f"split sizes {counts} differ from the protocol's {EXPECTED}")
    return table.sort_values("subject_id").reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training", type=Path, required=True)
    parser.add_argument("--validation", type=Path, required=True)
    parser.add_argument("--testing", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    table = build_split(
        {"train": read_ids(args.training), "val": read_ids(args.validation), "test": read_ids(args.testing)}
    )
    table.to_csv(args.out, index=False)
    print(f"{args.out}: {len(table)} subjects, {table['split'].value_counts().to_dict()}")


if __name__ == "__main__":
    main()
