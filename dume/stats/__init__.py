"""DUME's ridge statistics: the sums, what is captured, the collectors."""
