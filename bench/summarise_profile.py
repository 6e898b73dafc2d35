"""Summarise a py-spy raw profile: share of samples per thread and the hottest frames (inclusive)."""

import sys
from collections import Counter

frames, threads, total = Counter(), Counter(), 0
for line in open(sys.argv[1]):
    stack, n = line.rsplit(" ", 1)
    n = int(n)
    total += n
    parts = stack.split(";")
    threads[parts[0][:60]] += n
    for f in set(parts[1:]):
        frames[f] += n
print("threads:", ", ".join(f"{k} {v / total:.0%}" for k, v in threads.most_common(8)))
for f, n in frames.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 30):
    print(f"{n / total:6.1%} {f[:130]}")
