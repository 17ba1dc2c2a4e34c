"""sparsity/allocator.py: freed CPU tensors stay mapped for the next ones (no page faults)."""

import os
import subprocess
import sys

import pytest

from sparsity import allocator

# One fresh process each: (tuned?, is a new 4 MB tensor in the brk heap rather than a
# mapping of its own?, minor page faults of 30 rounds of a step-like pattern of tensors)
_PROBE = """
import resource, torch
from sparsity import allocator
took = allocator.keep_freed_memory()
t = torch.empty(1 << 20)
heap = [l.split()[0].split("-") for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]")]
in_heap = any(int(a, 16) <= t.data_ptr() < int(b, 16) for a, b in heap)
del t
def step():
    ts = [torch.empty(n << 18).fill_(1.0) for n in (3, 17, 5, 29, 11, 7)]  # 0.75-7 MB each
    del ts
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    step()
print(took, in_heap, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env) -> tuple[bool, bool, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(allocator.__file__)))
    took, in_heap, faults = out.stdout.split()
    return took == "True", in_heap == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc/self/maps")
def test_large_tensors_come_from_the_heap_and_are_reused_without_page_faults():
    took, in_heap, faults = _probe()
    if not took:
        pytest.skip("not glibc: mallopt is not there, keep_freed_memory does nothing")
    assert in_heap  # above glibc's first mmap threshold (128 KiB), yet served from the heap
    # 30 rounds of ~18 MB of tensors (4,608 pages a round): reused, not mapped and faulted in
    # again. Not zero: the interpreter's own allocations between the tensors can make the
    # heap grow a little now and then (0 to ~800 faults over the 30 rounds, seen here).
    assert faults < 30 * 4608 // 8
    took, in_heap, _ = _probe(CSP_MALLOC="system")
    assert not took and not in_heap  # the C library's defaults: a mapping of its own
