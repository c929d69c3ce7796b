"""The heaviest imports in a `python -X importtime` log: each top-level package's own time and the slowest chains.

    python3 -X importtime -c "import torch._inductor.compile_fx" 2> imports.txt
    python3 benchmarks/runtime/import_times.py imports.txt [--top 25]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def parse(text: str) -> list[tuple[int, int, int, str]]:
    """(own us, cumulative us, depth, module) per imported module, in the log's order."""
    return [(int(m[1]), int(m[2]), len(m[3]), m[4]) for m in map(LINE.match, text.splitlines()) if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    entries = parse(open(args.log).read())
    packages = Counter()
    for own, _, _, name in entries:
        packages[name.split(".")[0]] += own
    total = sum(packages.values())
    print(f"{len(entries)} modules, {total / 1e6:.2f} s of imports; by package (own time):",
          ", ".join(f"{p} {us / 1e6:.2f}" for p, us in packages.most_common(args.top)))
    print("slowest modules (cumulative):", ", ".join(f"{name} {cum / 1e6:.2f}" for _, cum, _, name in
                                                   sorted(entries, key=lambda e: -e[1])[:args.top]))


if __name__ == "__main__":
    main()
