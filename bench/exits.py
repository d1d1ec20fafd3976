#!/usr/bin/env python3
"""Benchmark: what one exit costs, and how fast guest kernel mode runs here.

Prints a table; asserts nothing.  These machines are shared and noisy, so each
figure is measured several times and reported as best / median / worst.
Usage: bench/exits.py [ROUNDS]
"""
from __future__ import annotations

import statistics
import sys

from lguest.doctor import measure_kernel_mode
from lguest.firstguests import exits_per_second


def spread(values: list[float]) -> tuple[float, float, float]:
    return max(values), statistics.median(values), min(values)


def main(argv: list[str]) -> int:
    rounds = int(argv[0]) if argv else 5
    rates = [exits_per_second(20000) for _ in range(rounds)]
    speeds = [measure_kernel_mode(runs=1) for _ in range(rounds)]
    rows = [
        ("port-I/O exits per second (Python loop)", *spread(rates), "{:,.0f}"),
        ("microseconds per exit round trip", *spread([1e6 / r for r in rates])[::-1], "{:.1f}"),
        ("ns per loop iteration, guest ring 0", *spread([s.ring0_ns for s in speeds])[::-1], "{:,.1f}"),
        ("ns per loop iteration, guest ring 3", *spread([s.ring3_ns for s in speeds])[::-1], "{:,.2f}"),
        ("ring 0 slowdown against ring 3", *spread([s.slowdown for s in speeds]), "{:,.0f}x"),
    ]
    print(f"{'measure (' + str(rounds) + ' rounds)':44} {'best':>10} {'median':>10} {'worst':>10}")
    for name, best, median, worst, fmt in rows:
        print(f"{name:44} {fmt.format(best):>10} {fmt.format(median):>10} {fmt.format(worst):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
