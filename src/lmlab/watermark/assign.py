"""Optimal assignment of items to classes with fixed counts (the Hungarian algorithm).

``assign_counts(costs, counts)`` gives each of n items one of k classes, class c exactly
``counts[c]`` times, minimising the summed cost: the classes are expanded into n slots and the
square problem is solved by the O(n³) shortest-augmenting-path form of the Hungarian algorithm
(Kuhn 1955; Jonker & Volgenant 1987), the inner loop over columns vectorised with numpy.
Greedy choices (each item its cheapest class, or classes filled in order) can miss the optimum
or break the counts; this cannot.
"""

from __future__ import annotations

import numpy as np

from lmlab.errors import LmlabError


def hungarian(costs: np.ndarray) -> np.ndarray:
    """For an (n, n) cost matrix, the column of each row in a minimum-cost perfect matching."""
    costs = np.asarray(costs, dtype=float)
    n = len(costs)
    if costs.shape != (n, n) or not np.isfinite(costs).all():
        raise LmlabError(f"costs must be a finite square matrix, got shape {costs.shape}")
    # potentials u (rows), v (columns); match[j] = 1-based row in column j (0: free); column 0 is a sentinel
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    match, way = np.zeros(n + 1, dtype=int), np.zeros(n + 1, dtype=int)
    for row in range(1, n + 1):
        match[0], col = row, 0
        slack, used = np.full(n + 1, np.inf), np.zeros(n + 1, dtype=bool)
        while match[col] != 0:  # grow a tree of tight edges until it reaches a free column
            used[col] = True
            r = match[col]
            reduced = costs[r - 1] - u[r] - v[1:]  # (n,) reduced costs from row r
            better = ~used[1:] & (reduced < slack[1:])
            slack[1:][better], way[1:][better] = reduced[better], col
            free_slack = np.where(used[1:], np.inf, slack[1:])
            nxt = int(np.argmin(free_slack)) + 1
            delta = free_slack[nxt - 1]
            u[match[used]] += delta
            v[used] -= delta
            slack[~used] -= delta
            col = nxt
        while col:  # flip the augmenting path
            prev = way[col]
            match[col], col = match[prev], prev
    out = np.empty(n, dtype=int)
    out[match[1:] - 1] = np.arange(n)
    return out


def assign_counts(costs: np.ndarray, counts: list[int]) -> np.ndarray:
    """(n,) class of each item: class c exactly ``counts[c]`` times, minimum total of ``costs[i, c]``."""
    costs = np.asarray(costs, dtype=float)
    if costs.ndim != 2 or costs.shape[1] != len(counts):
        raise LmlabError(f"costs of shape {costs.shape} do not match {len(counts)} class counts")
    if any(c < 0 for c in counts) or sum(counts) != len(costs):
        raise LmlabError(f"class counts {', '.join(map(str, counts))} must be >= 0 and add up to the "
                         f"{len(costs)} texts")
    slots = np.repeat(np.arange(len(counts)), counts)  # (n,) the class of each slot
    return slots[hungarian(costs[:, slots])]
