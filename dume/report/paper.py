"""The paper's published numbers, as data (Fanì & Ersoy, 2026: Table 2, the text on Figure 2, Table 3). Only
numbers printed in the paper are here; nothing is read off a plot.

Table 2: normalised score (100·p̂_d/p_d, the domain's own expert = 100), mean and std over three seeds, on the
M2D2 domains, whose names map onto this project's embedded domains as `PAPER_DOMAIN_NAMES` says.
"""

from __future__ import annotations

DOMAINS = ("code", "math", "physics", "history", "philosophy")
PAPER_DOMAIN_NAMES = {"code": "Coding", "math": "Mathematics", "physics": "Physics",
                      "history": "History", "philosophy": "Philosophy"}

# method -> {domain or "average": (mean, std)}; method names are this project's result names.
_ROWS = {
    "code_expert":       [(100.0, 0.0), (66.8, 0.0), (78.1, 0.0), (79.2, 0.0), (81.1, 0.0), (81.0, 0.0)],
    "math_expert":       [(89.9, 0.0), (100.0, 0.0), (75.2, 0.0), (69.4, 0.0), (71.4, 0.0), (81.2, 0.0)],
    "physics_expert":    [(80.2, 0.0), (58.8, 0.0), (100.0, 0.0), (80.0, 0.0), (81.8, 0.0), (80.2, 0.0)],
    "history_expert":    [(63.8, 0.0), (36.8, 0.0), (64.7, 0.0), (100.0, 0.0), (98.0, 0.0), (72.7, 0.0)],
    "philosophy_expert": [(66.9, 0.0), (40.2, 0.0), (66.3, 0.0), (95.3, 0.0), (100.0, 0.0), (73.7, 0.0)],
    "model_averaging":   [(86.8, 0.0), (63.1, 0.0), (83.7, 0.0), (90.4, 0.1), (93.1, 0.0), (83.4, 0.0)],
    "oracle":            [(95.9, 0.0), (87.3, 0.0), (95.1, 0.0), (97.1, 0.0), (98.6, 0.0), (94.8, 0.0)],
    "random_routing":    [(86.3, 2.0), (62.8, 2.6), (82.4, 1.0), (88.7, 0.6), (91.5, 0.6), (82.4, 0.9)],
    "BTX":               [(91.7, 0.1), (85.7, 0.5), (89.9, 1.3), (95.5, 0.2), (96.6, 0.3), (91.9, 0.5)],
    "DUME":              [(94.5, 0.0), (82.3, 0.0), (92.2, 0.0), (96.9, 0.0), (98.2, 0.0), (92.8, 0.0)],
    "DUMEplus":          [(94.1, 0.0), (85.6, 0.0), (94.0, 0.0), (97.6, 0.0), (98.4, 0.0), (93.9, 0.0)],
}
TABLE2 = {m: dict(zip(DOMAINS + ("average",), v)) for m, v in _ROWS.items()}

# Figure 2 (CLM curves) as far as the text states it; the curves' values are not printed.
FIGURE2_TEXT = {
    "tokens": ("Increasing the number of tokens generally improves results; in the CLM setting two "
               "tokens per paragraph already reach 90% of the dense experts' best performance, and "
               "1024 tokens nearly reach the maximum score."),
    "k": ("DUME and DUME+ are relatively unaffected by the choice of k in the CLM setting. The DUME "
          "CLM curve of Figure 2b used 2 tokens per paragraph for the statistics."),
    "lambda": "The choice of λ is not important in the CLM setting (λ = 0.01 is best in reasoning).",
}
# The one number the text gives for a CLM curve: two tokens per paragraph reach 90.
FIGURE2_TOKENS_2_REACHES = 90.0
# Settings the text states for the sweeps.
FIGURE2_DUME_K_SWEEP_TOKENS = 2
DEFAULT_LAMBDA = 0.01


# Table 3 (reasoning): normalised score 100·p_d/p̂_d, mean ± std over three seeds, per task + average.
REASONING_TASKS = ("math", "multilingual", "coding", "instruction")
_ROWS3 = {
    "math_expert":         [(100.0, 0.0), (95.9, 0.0), (86.0, 9.0), (46.5, 3.2), (82.1, 2.4)],
    "multilingual_expert": [(6.1, 0.8), (100.0, 0.0), (77.9, 8.5), (21.1, 0.8), (51.3, 1.8)],
    "coding_expert":       [(12.0, 0.2), (99.3, 0.0), (100.0, 0.0), (51.1, 5.1), (65.6, 1.3)],
    "instruction_expert":  [(28.2, 1.2), (99.8, 0.0), (79.5, 4.6), (100.0, 0.0), (76.9, 1.4)],
    "model_averaging":     [(44.7, 3.1), (100.1, 0.0), (97.6, 15.4), (59.0, 5.6), (75.3, 4.7)],
    "oracle":              [(94.3, 7.0), (100.2, 0.0), (94.0, 19.7), (85.3, 3.4), (93.4, 4.9)],
    "random_routing":      [(39.4, 2.6), (99.8, 0.0), (87.0, 15.2), (57.0, 3.8), (70.8, 3.7)],
    "DUME":                [(91.1, 2.2), (100.4, 0.0), (102.1, 5.9), (87.2, 1.0), (95.2, 1.7)],
    "DUME_OOD":            [(79.1, 2.0), (100.4, 0.0), (100.9, 1.3), (83.1, 1.0), (90.9, 0.1)],
}
TABLE3 = {m: dict(zip(REASONING_TASKS + ("average",), v)) for m, v in _ROWS3.items()}
# BTX is not in Table 3; the text gives its four scores (no std, no average). DUME+ has no reasoning result.
TABLE3_BTX_TEXT = dict(zip(REASONING_TASKS, (6.0, 95.8, 51.8, 51.9)))
