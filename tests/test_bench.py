"""The benchmarks' own machinery, where it can be checked without timing anything."""
from __future__ import annotations

import resource

from lguest.bench.peers import FRESH_MIB, fresh_memory


def test_fresh_memory_is_touched_in_a_child_and_not_counted_here():
    """Every peer's boot starts on memory the kernel has just zeroed: the child really
    touches FRESH_MIB, and the benchmark's own peak (which a VMM started by vfork would
    inherit) does not grow by it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    usage = fresh_memory()
    assert usage.ru_maxrss >= FRESH_MIB * 1024 * 0.9          # KiB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < before + FRESH_MIB * 1024 // 4
