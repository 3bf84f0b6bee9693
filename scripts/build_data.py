"""Build a REPRO_DATA_DIR from FineWeb, for running the chapters without a network later (needs it once).

    python scripts/build_data.py DIR                    # corpus/ (5,000 documents), corpus-xl/ (32,000), tiktoken/
    python scripts/build_data.py DIR --docs 2000 --xl-docs 8000
    export REPRO_DATA_DIR=DIR

See book/running.md ("Without a network: local data") for the folder's layout and which chapters read which corpus.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from repro_utils import data  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="the folder to write (becomes REPRO_DATA_DIR)")
    ap.add_argument("--docs", type=int, default=5_000, help="FineWeb documents in corpus/ (the smaller corpus)")
    ap.add_argument("--xl-docs", type=int, default=32_000, help="FineWeb documents in corpus-xl/ (a superset)")
    a = ap.parse_args(argv)
    try:
        counts = data.build_local(a.dir, docs=a.docs, xl_docs=a.xl_docs)
    except ValueError as e:
        ap.error(str(e))
    print(", ".join(f"{k}: {v:,} documents" for k, v in counts.items()) + f"; tiktoken/ in {a.dir}")
    print(f"now: export REPRO_DATA_DIR={a.dir.resolve()}")


if __name__ == "__main__":
    main()
