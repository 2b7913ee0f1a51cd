"""PEFT LoRA adapters as experts: checked before any work, merged into their base one at a time, cached.

Most fine-tunes on the hub are LoRA adapters, not checkpoints. An expert given as `model: BASE` + `adapter: A`
becomes an ordinary checkpoint directory -- peft's own `merge_and_unload` of A into BASE, saved as safetensors
with BASE's tokenizer files and generation config -- so everything after it (check_experts, fingerprints, the
statistics, MoErging) sees a dense expert like any other.

- Checked first, cheaply (`check_adapter`): peft importable, `adapter_config.json` readable and of a type peft
  merges into the weights (LoRA and its low-rank kin), the weights file present and readable, and the base the
  adapter records the same as `model:` -- a LoRA merged into another base is a plausible-looking wrong model.
- Merged one expert at a time (`merged_expert`): the base is loaded, merged, saved and dropped before the next, so
  memory holds one model whatever the number of adapters.
- Cached by content: `cache_root()/<key>`, the key hashing the base's content fingerprint and its tokenizer and
  generation-config files, the adapter's bytes, the merge dtype and peft's version. A rerun reuses it; an
  adapter or base changed on disk gets a new key. The folder is written with `atomic_dir`, its record
  (`dume_merged.json`) last, so an interrupted merge leaves nothing a rerun would take for finished.
- Merged in the base's stored dtype. On a CPU peft computes the low-rank product in float32 and adds it in
  place, so a bf16 merge rounds once: measured on a bf16 tiny Llama (hidden 256) it equals merging in float32 and
  rounding to bf16 in every element (0 of 1.33 M differ, LoRA deltas from 1e-4 to 2x the weights; adding a
  bf16-rounded delta instead would change 0.2 % to 30 % of them), at half the memory of a float32 copy
  (`tests/test_lora.py` checks it element for element).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dume.checkpoint.resolve import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, cached_snapshot, hub_id_of,
                                    looks_like_hub_id)
from dume.errors import DumeError

# peft types whose adapters `merge_and_unload` folds into the base weights (prompt/prefix tuning cannot be).
MERGEABLE_TYPES = ("LORA", "ADALORA", "LOHA", "LOKR")
MERGED_RECORD = "dume_merged.json"
GENERATION_CONFIG = "generation_config.json"
FORMAT_VERSION = 1
INSTALL = "pip install 'dume[lora]'"


@dataclass(frozen=True)
class Adapter:
    """A checked adapter: where it is, how the config names it, the base it is merged into."""

    given: str           # the config's `adapter:` value
    dir: Path            # its local folder
    base_given: str      # the config's `model:` value
    base: Path           # its local checkpoint directory
    peft_type: str
    note: str | None = None  # the base could not be verified (printed, not refused)


def require_peft():
    try:
        import peft
    except ImportError:
        raise DumeError(f"LoRA adapters as experts need peft, which is not installed: {INSTALL}") from None
    return peft


def cache_root() -> Path:
    """`$DUME_CACHE/merged_adapters`, else `$HF_HOME/dume_merged`: a merged expert is as large as its base, so it
    lives beside the other downloaded models, not in the run's folder."""
    if os.environ.get("DUME_CACHE"):
        return Path(os.environ["DUME_CACHE"]).expanduser() / "merged_adapters"
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "dume_merged"


def _weights_file(folder: Path) -> Path:
    return next(folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file())


def check_adapter(given: str, folder: Path, base_given: str, base: Path) -> Adapter:
    """The adapter at `folder` (resolved from `given`), refused in one line when peft is missing, its files are
    missing or corrupt, it is not a type peft merges, or it was made on another base than `base_given`."""
    peft = require_peft()
    from dume.checkpoint.io import read_json

    where = f"adapter {given}"
    try:
        raw = read_json(folder / ADAPTER_CONFIG)
    except DumeError as e:
        raise DumeError(f"{where}: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("peft_type"), str):
        raise DumeError(f"{where}: {folder / ADAPTER_CONFIG} is not a PEFT adapter config (no peft_type)")
    kind = raw["peft_type"].upper()
    if kind not in MERGEABLE_TYPES:
        raise DumeError(f"{where} is a {kind} adapter: only {', '.join(MERGEABLE_TYPES)} adapters can be merged "
                        "into an expert's weights")
    try:
        peft.PeftConfig.from_pretrained(str(folder))
    except Exception as e:
        raise DumeError(f"{where}: peft {peft.__version__} cannot read {folder / ADAPTER_CONFIG} "
                        f"({type(e).__name__}: {str(e)[:160]})") from None
    _check_weights(where, _weights_file(folder))
    note = base_mismatch(where, raw.get("base_model_name_or_path"), base_given, base)
    return Adapter(given=given, dir=folder, base_given=base_given, base=base, peft_type=kind, note=note)


def _check_weights(where: str, path: Path) -> None:
    """A weights file whose header (safetensors) or archive index (torch .bin) reads: a truncated download is
    refused here, not halfway through the merges."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                names = list(f.keys())
        except Exception as e:
            raise DumeError(f"{where}: {path} is corrupt ({type(e).__name__}: {str(e)[:120]})") from None
        if not names:
            raise DumeError(f"{where}: {path} holds no tensors")
    else:
        import zipfile

        if not zipfile.is_zipfile(path):
            raise DumeError(f"{where}: {path} is corrupt (not a torch archive)")


def base_mismatch(where: str, recorded, base_given: str, base: Path) -> str | None:
    """Refuse an adapter whose recorded base (`base_model_name_or_path`) is not `model:`; None when it matches,
    a note when it cannot be told here (no base recorded, or a recorded hub id not cached while `model:` is a
    local folder). The same: the same string, the same hub id (case aside; a cached snapshot's folder counts
    as its id), the same folder, or a folder holding the same tensors (a copy)."""
    if not isinstance(recorded, str) or not recorded.strip():
        return f"{where} records no base model (base_model_name_or_path); assuming it was made on {base_given}"
    recorded = recorded.strip()
    if recorded.rstrip("/") == base_given.rstrip("/"):
        return None
    rec_id = recorded if looks_like_hub_id(recorded) and not Path(recorded).expanduser().exists() else None
    model_id = base_given if looks_like_hub_id(base_given) and not Path(base_given).exists() else hub_id_of(base)
    if rec_id and model_id and rec_id.casefold() == model_id.casefold():
        return None
    rec_dir = Path(recorded).expanduser() if rec_id is None else cached_snapshot(rec_id, ["*.json", "*.safetensors"])
    refuse = DumeError(f"{where} was made on {recorded} (its {ADAPTER_CONFIG}'s base_model_name_or_path), but its "
                       f"model: is {base_given}; give that base as model:, or fix base_model_name_or_path if "
                       f"{base_given} is a copy of it")
    if rec_dir is not None and rec_dir.is_dir():
        from dume.checkpoint.fingerprint import content_fingerprint
        from dume.checkpoint.io import is_complete_checkpoint

        if rec_dir.resolve() == Path(base).resolve():
            return None
        if is_complete_checkpoint(rec_dir) and (content_fingerprint(rec_dir, store=False).tensors
                                                == content_fingerprint(base).tensors):
            return None
        raise refuse
    if rec_id and model_id:
        raise refuse  # two different hub ids
    return (f"{where} was made on {recorded}, which is not here to compare with model: {base_given}; assuming "
            "it is the same model")


def adapter_digest(folder: Path) -> str:
    """sha256 of the adapter's config and weights bytes (small files: read every time, no stamps to trust)."""
    h = hashlib.sha256()
    for path in (folder / ADAPTER_CONFIG, _weights_file(folder)):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _side_files_digest(base: Path) -> str:
    """sha256 of the base's tokenizer files and generation config, copied into the merged folder: the weights'
    fingerprint does not cover them, and a base given a tokenizer later must not keep a merge without one."""
    from dume.checkpoint.reader import TOKENIZER_FILES

    h = hashlib.sha256()
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if (base / name).is_file():
            h.update(name.encode() + b"\0" + (base / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def merge_record(adapter: Adapter, dtype) -> dict:
    """What the merged expert is made from; its hash names the cache folder."""
    from dume.checkpoint.fingerprint import fingerprint

    peft = require_peft()
    made = {"format": FORMAT_VERSION, "base_fingerprint": fingerprint(adapter.base),
            "base_side_files": _side_files_digest(adapter.base),
            "adapter_fingerprint": adapter_digest(adapter.dir), "dtype": str(dtype).removeprefix("torch."),
            "peft": peft.__version__}
    key = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:20]
    return {"key": key, **made, "base": adapter.base_given, "adapter": adapter.given, "peft_type": adapter.peft_type}


def _reusable(dest: Path, key: str) -> bool:
    from dume.checkpoint.io import is_complete_checkpoint

    try:
        return is_complete_checkpoint(dest) and json.loads((dest / MERGED_RECORD).read_text())["key"] == key
    except (OSError, ValueError, KeyError, TypeError):
        return False


def merged_expert(adapter: Adapter, *, log=print) -> Path:
    """The checkpoint directory of `adapter` merged into its base: from the cache, else merged now."""
    from dume.checkpoint.io import atomic_dir, atomic_write_json
    from dume.checkpoint.outputs import output_lock, require_free_space
    from dume.checkpoint.reader import CheckpointReader, majority_dtype

    with CheckpointReader(adapter.base) as rd:
        dtype = majority_dtype(rd.dtype(n) for n in rd.keys())
        size = sum((adapter.base / f).stat().st_size for f in rd.files)
    record = merge_record(adapter, dtype)
    dest = cache_root() / record["key"]
    with output_lock(dest, wait=True):  # a second build merging the same adapter waits, then reuses it
        if _reusable(dest, record["key"]):
            log(f"adapter {adapter.given}: reusing its merge into {adapter.base_given} ({dest})")
            return dest
        require_free_space(dest.parent, size, f"the merge of adapter {adapter.given}")
        log(f"adapter {adapter.given}: merging it into {adapter.base_given} in {str(dtype).removeprefix('torch.')}")
        with atomic_dir(dest, overwrite=True) as stage:
            merge_into(adapter, stage, dtype)
            atomic_write_json(stage / MERGED_RECORD, record)
    return dest


def load_base(path: Path, dtype):
    """The base model, on the CPU, in `dtype` (a seam: the tests watch that one model is alive at a time)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def merge_into(adapter: Adapter, stage: Path, dtype) -> None:
    """peft's merge of `adapter` into a fresh load of its base, saved in `stage` with the base's tokenizer files
    and generation config. The model is dropped before returning: the next merge loads the base again."""
    from peft import PeftModel

    from dume.checkpoint.reader import TOKENIZER_FILES

    base = load_base(adapter.base, dtype)
    try:
        merged = PeftModel.from_pretrained(base, str(adapter.dir)).merge_and_unload()
    except Exception as e:
        why = str(e).splitlines()[0][:200] if str(e) else ""
        raise DumeError(f"adapter {adapter.given}: peft could not merge it into {adapter.base_given} "
                        f"({type(e).__name__}: {why})") from None
    finally:
        del base
    merged.save_pretrained(str(stage))
    del merged
    gc.collect()
    # the base's files as they are: save_pretrained writes a generation config of its own making
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if (adapter.base / name).is_file():
            shutil.copyfile(adapter.base / name, stage / name)
