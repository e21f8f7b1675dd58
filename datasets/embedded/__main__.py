"""Build (or load) the embedded set, print a summary, optionally write the preview montage.

    python -m datasets.embedded [--seed 0] [--resolution 128] [--preview docs/img/embedded-preview.png]
"""

from __future__ import annotations

import argparse
import time

from datasets.embedded.build import load_embedded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m datasets.embedded", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=320)
    parser.add_argument("--n-val", type=int, default=48)
    parser.add_argument("--n-test", type=int, default=96)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--preview", default=None, help="write a PNG montage here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = load_embedded(args.seed, args.resolution, args.n_train, args.n_val, args.n_test, args.cache_dir)
    elapsed = time.perf_counter() - start
    print(f"embedded set at {data.manifest['path']} ({elapsed:.1f} s; build took {data.manifest.get('build_seconds')} s)")
    print(f"fingerprint {data.fingerprint()}, {len(data)} slices, modalities {data.modalities}")
    table = data.table
    print(table["split"].value_counts().to_string())
    test = table[table["split"] == "test"]
    if len(test):
        for column in ("size_class", "s1_bucket", "s2_bucket"):
            print(f"{column}: " + ", ".join(f"{k}={v}" for k, v in test[column].value_counts().sort_index().items()))
    if args.preview:
        from datasets.embedded.preview import save_preview

        print(f"preview: {save_preview(data, args.preview)}")


if __name__ == "__main__":
    main()
