"""Summarise a py-spy profile in its raw (collapsed stacks) format as text tables.

Usage, from the repository root::

    py-spy record --pid PID --rate 2000 --format raw --output burst.raw --duration 100
    .venv/bin/python benchmarks/fold_profile.py burst.raw [--under FUNCTION] [--rows N]

Each line of the raw format is a stack, its frames separated by ``;``, and
the number of samples in which it was seen. The summary lists the functions
with the most samples of their own (self) and with the most samples in
which they are on the stack (inclusive), as shares of all samples counted.
``--under`` counts only the stacks that pass through a frame whose text
contains FUNCTION, such as ``Engine.dispatch_many``, and drops the frames
above it, so the inclusive table starts at that function.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def read_stacks(path: Path) -> list[tuple[list[str], int]]:
    """Return (frames from the outermost, samples) for each line of a raw profile."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize(stacks: list[tuple[list[str], int]], rows: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, count in stacks:
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples\n"
    lines = [f"samples: {total}", "", "self:"]
    lines += [f"{100 * count / total:6.1f} %  {frame}" for frame, count in own.most_common(rows)]
    lines += ["", "inclusive:"]
    lines += [
        f"{100 * count / total:6.1f} %  {frame}" for frame, count in inclusive.most_common(rows)
    ]
    return "\n".join(lines) + "\n"


def _first_frame_with(frames: list[str], text: str) -> int | None:
    for index, frame in enumerate(frames):
        if text in frame:
            return index
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy output in the raw format")
    parser.add_argument("--under", help="count only stacks through a frame containing this text")
    parser.add_argument("--rows", type=int, default=25, help="rows per table (default 25)")
    args = parser.parse_args()
    stacks = read_stacks(args.profile)
    if args.under:
        trimmed = []
        for frames, count in stacks:
            start = _first_frame_with(frames, args.under)
            if start is not None:
                trimmed.append((frames[start:], count))
        stacks = trimmed
    print(summarize(stacks, args.rows), end="")


if __name__ == "__main__":
    main()
