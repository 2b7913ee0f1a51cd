"""DUME's statistics texts for the reasoning setting: the tasks' own data, or the experts' training sets (OOD)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from dume.errors import DumeError
from dume.reasoning.settings import PAPER
from dume.reasoning.tasks import DOMAINS

# DUME OOD: the experts' training sets (hub id, config, fields joined into one text). The first field is the
# prompt side, all the original used (for tulu, the first message); statistics_text="full" joins them all.
OOD_DATASETS = {"coding": ("ise-uiuc/Magicoder-OSS-Instruct-75K", None, ("problem", "solution")),
                "math": ("hkust-nlp/dart-math-hard", None, ("query", "response")),
                "multilingual": ("CohereForAI/aya_dataset", None, ("inputs", "targets")),
                "instruction": ("allenai/tulu-3-sft-personas-instruction-following", None, ("messages",))}

# Fields tried, in order, when reading local OOD files: prompt side only, or (statistics_text="full") all.
PROMPT_TEXT_FIELDS = ("text", "problem", "query", "inputs", "prompt", "question", "instruction", "messages")
TEXT_FIELDS = ("text", "problem", "solution", "query", "response", "inputs", "targets", "prompt", "messages",
               "question", "answer", "instruction", "output", "content")


def _record_text(rec: dict, fields: Sequence[str], prompt_only: bool = False) -> str:
    """The record's text: all fields joined, or with `prompt_only` the first present (chat: first message)."""
    parts = []
    for f in fields:
        v = rec.get(f)
        if isinstance(v, list):  # chat messages
            msgs = v[:1] if prompt_only else v
            v = "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in msgs)
        if v:
            parts.append(str(v))
            if prompt_only:
                break
    return "\n".join(parts)


def ood_documents(domain: str, ood_data_dir: str | os.PathLike | None = None,
                  max_num_samples: int | None = None, text: str = "prompt") -> tuple[list[str], str]:
    """Text from the expert's training set: local files OOD_DATA_DIR/<domain>/*.jsonl|*.json|*.txt
    (fields tried: TEXT_FIELDS), else the hub dataset of OOD_DATASETS."""
    from dume.checkpoint.io import read_records
    from dume.text.files import paragraphs

    if ood_data_dir is not None:
        root = Path(ood_data_dir) / domain
        files = sorted(f for f in root.glob("*") if f.suffix in (".jsonl", ".json", ".txt", ".gz")) if root.is_dir() else []
        if not files:
            raise DumeError(f"--ood-data-dir: no files for {domain} in {root} (*.jsonl, *.json or *.txt)")
        texts: list[str] = []
        for f in files:
            if f.suffix == ".txt":
                texts += paragraphs(f, strip=False)
            else:
                fields = PROMPT_TEXT_FIELDS if text == "prompt" else TEXT_FIELDS
                texts += [_record_text(r, fields, text == "prompt") for r in read_records(f) if isinstance(r, dict)]
            if max_num_samples is not None and len(texts) >= max_num_samples:
                break
        source = f"local:{root}"
    else:
        import datasets

        path, name, fields = OOD_DATASETS[domain]
        try:
            split = f"train[:{max_num_samples}]" if max_num_samples else "train"
            ds = datasets.load_dataset(path, name, split=split)
        except Exception as e:
            raise DumeError(f"DUME OOD: cannot load {path} from the hub ({type(e).__name__}: {str(e)[:200]}); "
                            f"pass --ood-data-dir with local files") from e
        texts = [_record_text(r, fields, text == "prompt") for r in ds]
        source = f"hub:{path} (train)"
    from dume.reasoning.tasks import finish_texts

    return finish_texts(texts, max_num_samples, f"DUME OOD: no text for {domain} ({source})"), source


def statistics_documents(*, ood: bool, data_dir=None, ood_data_dir=None,
                         max_num_samples: int | None = PAPER["max_num_samples"], languages=None,
                         text: str = "prompt", balance: bool = True
                         ) -> tuple[dict[str, list[str]], dict[str, str], str, dict[str, dict]]:
    """{domain: texts}, {domain: source}, a one-line description of where they came from, and {domain:
    exactly which texts} (ids, count, SHA-256 of the texts). Defaults are the original's: the prompt side of
    each record only, at most 2048 texts per domain, m_arc spread evenly over its languages."""
    from dume.reasoning.tasks import task_selection, texts_sha256

    docs, sources, selection = {}, {}, {}
    for d in DOMAINS:
        if ood:
            docs[d], sources[d] = ood_documents(d, ood_data_dir, max_num_samples, text)
            selection[d] = {"source": sources[d], "text": text, "count": len(docs[d]),
                            "ids": [str(i) for i in range(len(docs[d]))], "sha256": texts_sha256(docs[d])}
        else:
            docs[d], sources[d], selection[d] = task_selection(d, data_dir, max_num_samples, languages, text,
                                                               balance)
    cap = "all" if max_num_samples is None else f"at most {max_num_samples}"
    side = "prompt side only" if text == "prompt" else "prompt and answer"
    what = ((f"DUME OOD: statistics from the experts' training datasets (not the evaluation tasks), {side}, "
             f"{cap} texts per domain") if ood else
            f"DUME statistics from the evaluation tasks' own data (train split where one exists, else test), "
            f"{side}, {cap} texts per domain" + (", m_arc balanced over its languages" if balance else "")
            + " - the paper's default for Table 3")
    return docs, sources, what, selection


def router_training_documents(*, data_dir=None, languages=None, per_task: int | None = None, seed: int = 0,
                              text: str = "prompt") -> tuple[dict[str, list[str]], dict]:
    """BTX / DUME+ training text as the original built it, and a record of it: `per_task` (820) prompts per
    task (all of a smaller task, repeated to fill; m_arc balanced over its languages), shuffled with `seed`."""
    import random

    from dume.reasoning.tasks import ROUTER_TRAINING_PER_TASK, task_selection

    per_task = per_task or ROUTER_TRAINING_PER_TASK
    rng = random.Random(seed)
    docs, record = {}, {}
    for d in DOMAINS:
        texts, source, _ = task_selection(d, data_dir, None if d != "multilingual" else per_task, languages, text)
        pool = list(texts)
        if d != "multilingual":
            rng.shuffle(pool)
        filled = (pool * (per_task // len(pool) + 1))[:per_task]
        rng.shuffle(filled)
        docs[d] = filled
        record[d] = {"source": source, "available": len(texts), "used": len(filled), "text": text}
    return docs, {"per_task": per_task, "seed": seed, "tasks": record}

