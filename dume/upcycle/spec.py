"""The `dume build` YAML: every key and value checked before any heavy work."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dume.checkpoint.shards import DEFAULT_MAX_SHARD_BYTES, parse_size
from dume.checks import positive_int, positive_number
from dume.errors import DumeError
from dume.routers.registry import build_gates
from dume.runtime.devices import check_device

# `gate:` values -> registered strategies: the registry's `build_gate` (dume.routers.registry).
GATES = build_gates()
DTYPES = ("auto", "float32", "bfloat16")
TOP_KEYS = {"experts", "gate", "k", "lambda", "temperature", "num_dume_tokens", "dtype", "out", "seq_len",
            "batch_size", "held_out", "seed", "device", "max_shard_size", "evaluate"}
EXPERT_KEYS = {"name", "model", "data", "split", "field", "max_docs", "adapter"}
MAX_HELD_OUT = 64


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    model: str
    data: str
    split: str = "train"
    field: str = "text"
    max_docs: int | None = None
    adapter: str | None = None  # a PEFT LoRA adapter on `model` (dume.checkpoint.adapters): merged into it first


@dataclass(frozen=True)
class BuildSpec:
    experts: tuple[ExpertSpec, ...]
    out: Path
    gate: str = "dume"
    k: int = 1
    lam: float = 0.01
    temperature: float = 1.0
    num_dume_tokens: int | None = None
    dtype: str = "auto"
    seq_len: int = 1024
    batch_size: int = 8
    held_out: float = 0.05
    seed: int = 0
    device: str = "auto"
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES
    evaluate: bool = False          # the evaluation report on the held-out documents (dume.upcycle.evaluate)
    evaluate_random_routing: bool = False
    source: Path | None = field(default=None, compare=False)


def _local(value: str, base: Path) -> str:
    """A path relative to the config file's folder when it exists there; else as given (an absolute path, or a
    hub id)."""
    p = Path(value).expanduser()
    q = p if p.is_absolute() else base / p
    return str(q) if q.exists() else value


def parse_spec(raw, source: Path | None = None) -> BuildSpec:
    """A checked BuildSpec from the YAML's mapping: unknown keys and bad values are one clear error each."""
    where = str(source) if source else "the build config"
    if not isinstance(raw, dict):
        raise DumeError(f"{where}: expected a mapping of settings, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise DumeError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(TOP_KEYS))}")
    for key in ("experts", "out"):
        if key not in raw:
            raise DumeError(f"{where}: missing {key!r}")
    base = source.parent if source else Path.cwd()
    experts_raw = raw["experts"]
    if not isinstance(experts_raw, list) or len(experts_raw) < 2:
        raise DumeError(f"{where}: 'experts' must be a list of two or more experts")
    experts = []
    for i, e in enumerate(experts_raw):
        label = f"{where}: experts[{i}]"
        if not isinstance(e, dict):
            raise DumeError(f"{label} must be a mapping with name, model, data")
        bad = sorted(set(e) - EXPERT_KEYS)
        if bad:
            raise DumeError(f"{label}: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(EXPERT_KEYS))}")
        for key in ("name", "model", "data"):
            if not isinstance(e.get(key), str) or not e[key].strip():
                raise DumeError(f"{label}: {key!r} must be a non-empty string")
        for key in ("split", "field"):
            if key in e and (not isinstance(e[key], str) or not e[key]):
                raise DumeError(f"{label}: {key!r} must be a non-empty string")
        if "adapter" in e and (not isinstance(e["adapter"], str) or not e["adapter"].strip()):
            raise DumeError(f"{label}: 'adapter' must be a non-empty string (a PEFT adapter folder or hub id)")
        check_name(label, e["name"].strip())
        experts.append(ExpertSpec(name=e["name"].strip(), model=_local(e["model"], base), data=_local(e["data"], base),
                                  split=e.get("split", "train"), field=e.get("field", "text"),
                                  max_docs=positive_int(f"{label}.max_docs", e.get("max_docs"), allow_none=True),
                                  adapter=_local(e["adapter"].strip(), base) if "adapter" in e else None))
    names = [e.name for e in experts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DumeError(f"{where}: expert names must be unique, {', '.join(dup)} repeated")
    gate = raw.get("gate", "dume")
    if gate not in GATES:
        raise DumeError(f"{where}: gate must be one of {', '.join(GATES)}, got {gate!r}")
    k = positive_int(f"{where}: k", raw.get("k", 1))
    if k > len(experts):
        raise DumeError(f"{where}: k = {k} exceeds the number of experts ({len(experts)})")
    dtype = raw.get("dtype", "auto")
    if dtype not in DTYPES:
        raise DumeError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    held = raw.get("held_out", 0.05)
    if isinstance(held, bool) or not isinstance(held, (int, float)) or not 0 <= held < 1:
        raise DumeError(f"{where}: held_out must be a fraction in [0, 1), got {held!r}")
    try:
        device = check_device(raw.get("device", "auto"))
    except DumeError as e:
        raise DumeError(f"{where}: {e}") from None
    try:
        max_shard_size = parse_size(raw.get("max_shard_size", DEFAULT_MAX_SHARD_BYTES))
    except DumeError as e:
        raise DumeError(f"{where}: {e}") from None
    out = raw["out"]
    if not isinstance(out, str) or not out.strip():
        raise DumeError(f"{where}: 'out' must be a path")
    out_path = Path(out).expanduser()
    out_path = out_path if out_path.is_absolute() else base / out_path
    check_out(where, out_path, experts, source)
    evaluate, random_routing = parse_evaluate(where, raw.get("evaluate", False))
    if evaluate and float(held) == 0:
        raise DumeError(f"{where}: evaluate needs held-out documents: set held_out above 0 (e.g. 0.05)")
    seed = positive_int(f"{where}: seed", raw.get("seed", 0), minimum=0)
    if seed >= 2**32:
        raise DumeError(f"{where}: seed must be below 2**32 (numpy's and CUDA's limit), got {seed}")
    return BuildSpec(
        experts=tuple(experts), out=out_path, gate=gate, k=k,
        lam=positive_number(f"{where}: lambda", raw.get("lambda", 0.01)),
        temperature=positive_number(f"{where}: temperature", raw.get("temperature", 1.0)),
        num_dume_tokens=positive_int(f"{where}: num_dume_tokens", raw.get("num_dume_tokens"), allow_none=True),
        dtype=dtype, seq_len=positive_int(f"{where}: seq_len", raw.get("seq_len", 1024)),
        batch_size=positive_int(f"{where}: batch_size", raw.get("batch_size", 8)), held_out=float(held),
        seed=seed, device=device, max_shard_size=max_shard_size, evaluate=evaluate,
        evaluate_random_routing=random_routing, source=source)


def parse_evaluate(where: str, value) -> tuple[bool, bool]:
    """`evaluate: true|false`, or a mapping `{random_routing: true}`: (evaluate, with random routing)."""
    if isinstance(value, bool):
        return value, False
    if isinstance(value, dict):
        bad = sorted(set(value) - {"random_routing"})
        if bad or not isinstance(value.get("random_routing", False), bool):
            raise DumeError(f"{where}: evaluate takes true/false or {{random_routing: true/false}}, got {value!r}")
        return True, value.get("random_routing", False)
    raise DumeError(f"{where}: evaluate must be true or false (or {{random_routing: true}}), got {value!r}")


def check_name(where: str, name: str) -> None:
    """An expert name becomes a domain name (statistics, recipe, config, later edits by name): no path separators,
    no leading dot, no control characters."""
    if "/" in name or "\\" in name or name.startswith(".") or any(ord(c) < 32 for c in name):
        raise DumeError(f"{where}: name {name!r} must not contain '/', '\\' or control characters, nor start "
                        "with '.'; use letters, digits, '-' or '_'")


def check_out(where: str, out: Path, experts, source: Path | None) -> None:
    """`out` must be creatable, and must not be, contain or lie inside anything the build reads (a local expert,
    a data file or folder, the config file itself)."""
    from dume.checkpoint.outputs import check_output_path, check_writable_location

    inputs = [Path(v) for e in experts for v in (e.model, e.data, e.adapter) if v and Path(v).exists()]
    if source is not None:
        inputs.append(source)
    try:
        check_writable_location(out, "out")
        check_output_path(out, inputs, "out")
    except DumeError as e:
        raise DumeError(f"{where}: {e}") from None


def load_spec(path: str | os.PathLike) -> BuildSpec:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DumeError(f"build config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DumeError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_spec(raw, path.resolve())
