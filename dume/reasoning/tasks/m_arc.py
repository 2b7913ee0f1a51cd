"""multilingual: m_arc (Okapi's multilingual ARC), 0-shot, scored by log-likelihood
(acc_norm averaged over the languages). Paper protocol: the original's 30 languages (no
Danish); lm-eval protocol: all 31. Local files: DATA_DIR/m_arc/<lang>/{train,validation,
test}.jsonl with {"id", "instruction", "option_a".."option_e", "answer"}."""

from __future__ import annotations

import os
from pathlib import Path

from dume.checkpoint.io import read_records
from dume.errors import DumeError
from dume.reasoning.tasks.base import Task, TaskContext, _split_files, _stock_task_yaml, hub_records

# Okapi's multilingual ARC languages as lm-eval ships them (okapi/arc_multilingual/arc_xx.yaml).
ARC_LANGUAGES = ("ar", "bn", "ca", "da", "de", "es", "eu", "fr", "gu", "hi", "hr", "hu", "hy", "id", "it", "kn",
                 "ml", "mr", "ne", "nl", "pt", "ro", "ru", "sk", "sr", "sv", "ta", "te", "uk", "vi", "zh")
# The original code's m_arc list: lm-eval's languages without Danish.
PAPER_ARC_LANGUAGES = tuple(lang for lang in ARC_LANGUAGES if lang != "da")
HUB = ("alexandrainst/m_arc", None)


def local_arc_languages(data_dir: str | os.PathLike) -> list[str]:
    root = Path(data_dir) / "m_arc"
    if not root.is_dir():
        return []
    return [lang for lang in sorted(p.name for p in root.iterdir() if p.is_dir())
            if "test" in _split_files(root / lang)]


def configs(ctx: TaskContext):
    every = PAPER_ARC_LANGUAGES if ctx.protocol == "paper" else ARC_LANGUAGES
    if ctx.local is None:
        langs = list(ctx.languages or every)
        bad = [lang for lang in langs if lang not in ARC_LANGUAGES]
        if bad:
            raise DumeError(f"unknown m_arc languages {bad}; lm-eval has {', '.join(ARC_LANGUAGES)}")
        return ctx.spec([f"arc_{lang}" for lang in langs], "hub:alexandrainst/m_arc")
    found = local_arc_languages(ctx.local)
    langs = [lang for lang in (ctx.languages or [x for x in found if x in every]) if lang in found]
    if not langs:
        raise DumeError(f"no local m_arc data: expected {ctx.local / 'm_arc' / '<lang>' / 'test.jsonl'}")
    names = []
    for lang in langs:
        files = _split_files(ctx.local / "m_arc" / lang)
        splits = "".join(f"{s}_split: {'null' if s_file not in files else s_file}\n"
                         for s, s_file in (("training", "train"), ("validation", "validation")))
        name = f"dume_{ctx.tag}_arc_{lang}"
        names.append(ctx.write(name, _stock_task_yaml(name, ctx.stock / "okapi" / "arc_multilingual" / "_arc_yaml",
                                                      files, splits + "test_split: test\n")))
    notes = [] if len(langs) == len(every) else [
        f"{len(langs)} of the protocol's {len(every)} m_arc languages have local data: {', '.join(langs)}"]
    return ctx.spec(names, f"local:{ctx.local / 'm_arc'}", notes)


def records(data_dir, languages=None):
    if data_dir is None:
        return hub_records(HUB, {lang: lang for lang in languages or PAPER_ARC_LANGUAGES})
    root = Path(data_dir)
    found = local_arc_languages(root)
    langs = [x for x in (languages or [x for x in found if x in PAPER_ARC_LANGUAGES]) if x in found]
    if not langs:
        raise DumeError(f"no local m_arc data in {root / 'm_arc'}")
    groups, used = {}, []
    for lang in langs:
        files = _split_files(root / "m_arc" / lang)
        split = "train" if "train" in files else "test"
        groups[lang] = list(read_records(files[split]))
        used.append(f"{lang}:{split}")
    return groups, "train", f"{root / 'm_arc'} ({', '.join(used)})"


def arc_text(doc: dict) -> str:
    opts = [doc.get(f"option_{c}") for c in "abcde"]
    return "Question: " + str(doc.get("instruction", "")) + "\n" + "\n".join(o for o in opts if o) + \
        f"\nAnswer: {doc.get('answer', '')}"


def arc_order(langs) -> list[str]:
    """The original visited m_arc's languages in lm-eval's task-dict order, which is
    reversed (zh, vi, uk, ...): the first of these get the remainder of the cap."""
    return sorted(langs, reverse=True)


TASK = Task(domain="multilingual", heading="Multilingual",
            metric={"paper": "acc_norm,none", "lm-eval": "acc_norm,none"}, configs=configs, records=records,
            prompt_field="instruction", full_text=arc_text, hub=HUB, group_order=arc_order)
