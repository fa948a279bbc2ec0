"""Throwaway (session 53): the answer-level citation aggregations tried (sentence -> its per-token weights)."""
import json, statistics, sys
def first_n(tokens):
    for i, t in enumerate(tokens):
        if t.strip().endswith((".", "!", "?")) and i >= 1:
            return i + 1
    return len(tokens)
A = {
 "sum": lambda w, n: sum(w),
 "peak": lambda w, n: max(w),
 "ex_med": lambda w, n: sum(max(0, x - statistics.median(w)) for x in w),
 "ex_min": lambda w, n: sum(x - min(w) for x in w),
 "ex_mean": lambda w, n: sum(max(0, x - statistics.mean(w)) for x in w),
 "sq": lambda w, n: sum(x * x for x in w),
 "cube": lambda w, n: sum(x ** 3 for x in w),
 "p4": lambda w, n: sum(x ** 4 for x in w),
 "p6": lambda w, n: sum(x ** 6 for x in w),
 "first": lambda w, n: sum(w[:n]),
 "first_sq": lambda w, n: sum(x * x for x in w[:n]),
 "first_ex_min": lambda w, n: sum(x - min(w) for x in w[:n]),
}
