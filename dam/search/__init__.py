"""Searches over merges above evaluation and merge: soups, CMA-ES evolution, kinship-guided greedy merging."""
