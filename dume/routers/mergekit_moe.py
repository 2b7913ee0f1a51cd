"""The real `mergekit-moe` (arcee-ai/mergekit 0.1.5) as a peer in the routers study (issue 23).

Why a peer and not a registry strategy: `mergekit_hidden` (`dume.routers.prompt_hidden`) is our reading of
mergekit's hidden gate, built like every other row; the peer is the tool itself, so the study can show what a user
of it gets. It is driven through its command line (`clm_routers_study.py --peers mergekit --mergekit-moe PATH`),
from an install of its own: a venv of its own keeps its extra dependencies (peft, sentencepiece, protobuf,
immutables) and its version ranges from ever moving ours (0.1.5's ranges do resolve with ours, `pip install
--dry-run`, so PATH may also be in our venv); nothing of it is imported here. A peer row is one gate mode x one
base model, named `mergekit-moe:<mode>@<base>`; its YAML holds the run's experts and the same 8 prompts per domain
as `mergekit_hidden`, and its output (a stock Mixtral checkpoint) is evaluated like every row.

How the tool differs from DUME, read in mergekit 0.1.5's source (`METHOD_DIFFERENCES`, printed in ROUTERS.md):
`mixtral.MixtralMoE.write_model` copies the base model's non-MLP weights, `router.get_gate_params` loads the base
model in bf16 for the hidden gate, and `scripts.moe.build` pads the prompts on the left with BOS.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from dume.errors import DumeError

PEER = "mergekit-moe"
GATE_MODES = ("hidden", "cheap_embed", "random")
BASES = ("seed", "model_averaging")  # the run's seed model, the model-averaging checkpoint
EXPERTS_PER_TOKEN = 1                # every other row's k (mergekit's default is 2)
DTYPE = "float32"                    # the experts' dtype: no rounding the other rows do not have
VENV_HOWTO = ("python -m venv ~/venvs/mergekit && ~/venvs/mergekit/bin/pip install torch "
              "--index-url https://download.pytorch.org/whl/cpu && ~/venvs/mergekit/bin/pip install mergekit==0.1.5")
METHOD_DIFFERENCES = (
    ("shared weights: mergekit copies the base model's non-MLP weights (embeddings, attention, norms, head; "
     "`moe/mixtral.py` `MixtralMoE.write_model`), where DUME and every registry row average the experts'; "
     "`@model_averaging` therefore has DUME's shared weights, `@seed` the seed model's"),
    ("hidden gate: the residual stream of the base model at each layer's input, at the prompt's last token, "
     "averaged over the prompts and normalised -- read in bf16 (`moe/router.py` `get_gate_params` loads the base "
     "model with `torch_dtype=torch.bfloat16` whatever `dtype` says), with the prompts batched and padded on the "
     "LEFT with BOS (`scripts/moe.py` `build`: `padding_side = \"left\"`), so the last position is a real token; "
     "our `mergekit_hidden` runs them one at a time in float32 from the seed model, on averaged shared weights"),
    "cheap_embed: the normalised sum of the prompts' token embeddings (BOS included), the same row at every layer",
    "random: N(0, 1) gates, seeded with the run's seed (`--random-seed`)",
    (f"every mode: the same 8 prompts per domain as `mergekit_hidden`, {EXPERTS_PER_TOKEN} expert per token like every "
     f"other row (mergekit's default is 2), `dtype: {DTYPE}`"),
)


def row_name(mode: str, base: str) -> str:
    return f"{PEER}:{mode}@{base}"


def rows() -> tuple[str, ...]:
    return tuple(row_name(m, b) for m in GATE_MODES for b in BASES)


def is_peer(name: str) -> bool:
    return name.startswith(PEER + ":")


def parse_row(name: str) -> tuple[str, str]:
    """(gate mode, base) of a peer row's name, or a clear error."""
    mode, _, base = name[len(PEER) + 1:].partition("@") if is_peer(name) else ("", "", "")
    if mode not in GATE_MODES or base not in BASES:
        raise DumeError(f"{name!r} is not a {PEER} row: choose from {', '.join(rows())}")
    return mode, base


def result_stem(name: str) -> str:
    """The row's file name (results/<stem>.json, models/<stem>): the row name without the colon."""
    return name.replace(":", "_") if is_peer(name) else name


def reads(name: str) -> str:
    mode, base = parse_row(name)
    model = "seed model" if base == "seed" else "averaged model"
    return {"hidden": f"{model} + 8 prompts", "cheap_embed": f"{model}'s embeddings + 8 prompts",
            "random": "a seed"}[mode] + f"; {model}'s shared weights"


def description(name: str) -> str:
    mode, base = parse_row(name)
    what = {"hidden": "the hidden gate (the base model's last-token residual stream per layer, mean over the "
                      "prompts)", "cheap_embed": "the cheap_embed gate (the prompts' summed token embeddings, "
                                                 "every layer alike)", "random": "random gates"}[mode]
    base_text = "the run's seed model" if base == "seed" else "the model-averaging checkpoint"
    return f"the real `{PEER}` (a peer, its own venv): {what}, base model = {base_text}"


def moe_config(base_dir, experts: dict[str, Path], prompts: dict[str, list[str]], gate_mode: str) -> dict:
    """The YAML `mergekit-moe` reads, as a dict: experts in domain order, each with its domain's prompts."""
    if gate_mode not in GATE_MODES:
        raise DumeError(f"gate mode {gate_mode!r}: choose from {', '.join(GATE_MODES)}")
    missing = [d for d in experts if not prompts.get(d)]
    if missing:
        raise DumeError(f"no prompts for {missing}: mergekit's prompt gates need some for every expert")
    return {"base_model": str(Path(base_dir).resolve()), "gate_mode": gate_mode, "dtype": DTYPE,
            "experts_per_token": EXPERTS_PER_TOKEN,
            "experts": [{"source_model": str(Path(p).resolve()), "positive_prompts": list(prompts[d])}
                        for d, p in experts.items()]}


def write_config(path, config: dict) -> Path:
    import yaml

    from dume.checkpoint.io import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000))


def _env() -> dict:
    """The tool never reaches the hub: every model it reads is a local folder."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def check_executable(exe) -> str:
    """The tool's version (its venv's mergekit), after checking that `exe --help` runs: a wrong path is refused
    in one line before any work."""
    exe = str(exe)
    try:
        done = subprocess.run([exe, "--help"], check=False, capture_output=True, text=True, timeout=300, env=_env())
    except (OSError, subprocess.SubprocessError) as e:
        raise DumeError(f"--mergekit-moe {exe} does not run ({type(e).__name__}: {e}); make its venv: "
                        f"{VENV_HOWTO}") from None
    if done.returncode != 0 or "mergekit-moe" not in done.stdout:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DumeError(f"--mergekit-moe {exe} does not run as mergekit-moe (exit {done.returncode}: {last})")
    return tool_version(exe)


def tool_version(exe) -> str:
    """mergekit's version as the executable's own interpreter (its shebang) reports it, else 'unknown'."""
    try:
        with open(exe, "rb") as f:
            first = f.readline().decode(errors="replace").strip()
        if not first.startswith("#!"):
            return "unknown"
        code = "import importlib.metadata as m; print(m.version('mergekit'))"
        out = subprocess.run([*first[2:].split(), "-c", code], check=False, capture_output=True, text=True, timeout=120, env=_env())
        return (out.stdout.strip() or "unknown") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_mergekit(exe, config: dict, out_dir, *, seed: int, log_path) -> Path:
    """Write `config` as OUT_DIR/mergekit_moe_config.yml (the name mergekit gives its own copy) and run
    `exe CONFIG OUT_DIR` on the CPU; its output goes to `log_path`. A failure raises with the log's last line."""
    out_dir, log_path = Path(out_dir), Path(log_path)
    cfg = write_config(out_dir / "mergekit_moe_config.yml", config)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(exe), str(cfg), str(out_dir), "--device", "cpu", "--random-seed", str(seed),
           "--no-write-model-card", "--quiet"]
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=_env()).returncode
        except OSError as e:
            raise DumeError(f"{exe} does not run: {e}") from None
    if rc != 0:
        lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        raise DumeError(f"{PEER} failed (exit {rc}): {lines[-1] if lines else 'no output'} (log: {log_path})")
    return out_dir
