"""One training loop for everything that trains: the seed model, the experts, the routers of BTX and DUME+.

It runs on `accelerate`: single-process on a CPU, DDP with bf16 autocast under `accelerate launch` on GPUs. The
schedule is the paper's: linear warmup from 0.1x to the peak learning rate, then cosine down to 0.1x. Small
domains stop on validation loss (patience) and keep their best weights, because an expert that overfits its few
thousand tokens drifts away from the seed and ruins MoErging (docs/design.md §4). The optimizer recipes, this
project's `embedded` and the original code's `original`, are `OPTIM_RECIPES`.

Multi-process: the LR scheduler is *not* handed to `accelerator.prepare` (a prepared scheduler advances once per
process per optimizer step, compressing warmup and cosine N-fold under N processes); it is stepped here once per
optimizer step, so the LR at step s is the same for 1 and N processes (`history["lr"]`). The data loader is
sharded, so the effective batch is per-device batch × accumulation × processes (`history["effective_batch"]`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from tqdm.auto import tqdm

from dume.errors import DumeError
from dume.runtime.distributed import world_size
from dume.train.perplexity import summed_nll

OPTIM_RECIPES = {
    "embedded": dict(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, decay_all=False, param_dtype="float32",
                     sum_accumulated_loss=False),
    # The original (utils/optimizer.py): torch.optim.AdamW(model.parameters(), lr), loss.backward() per micro-batch
    # (summed, not averaged, before one clipped step), its model cast to bfloat16 (models/llama.py). We keep
    # float32 master weights (bf16 autocast with --mixed-precision bf16): pure-bf16 AdamW drops every update below
    # the weight's bf16 spacing, so DUME+'s lr 1e-5 on gates of ~0.04 left 92 % of them unchanged -- DUME+ would be
    # DUME, not the paper's result. `param_dtype="bfloat16"` (`--pure-bf16`) is the literal one.
    "original": dict(weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, decay_all=True, param_dtype="float32",
                     sum_accumulated_loss=True),
}


@dataclass
class TrainConfig:
    lr: float = 3e-3
    steps: int = 100                 # optimizer steps
    warmup: int = 10
    batch_size: int = 16             # sequences per micro-batch and device
    grad_accum: int = 1
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    decay_all: bool = False          # weight decay on every parameter (the original) or matrices only
    param_dtype: str = "float32"     # "bfloat16": train in bf16 weights, as the original code did
    sum_accumulated_loss: bool = False  # the original summed its micro-batch losses
    compile: bool = False            # torch.compile the model (GPU; see dume.train.speed)
    clip: float = 1.0
    start_ratio: float = 0.1         # warmup starts at start_ratio * lr
    final_ratio: float = 0.1         # cosine ends at final_ratio * lr
    eval_every: int = 50             # steps between validations (0: only at the end)
    patience: int = 0                # evaluations without improvement before stopping (0: never stop)
    seed: int = 0
    mixed_precision: str | None = None  # "bf16" on GPUs; None: what `accelerate launch` was given, else "no"
    wandb_project: str | None = None  # off unless asked
    extra: dict = field(default_factory=dict)

    @classmethod
    def with_recipe(cls, recipe: str, **kwargs) -> "TrainConfig":
        if recipe not in OPTIM_RECIPES:
            raise DumeError(f"unknown optimizer recipe {recipe!r}: choose from {sorted(OPTIM_RECIPES)}")
        given = {k: v for k, v in kwargs.items() if v is not None or k == "mixed_precision"}
        return cls(**{**OPTIM_RECIPES[recipe], **given, "extra": {"recipe": recipe}})

    def validate(self) -> None:
        if self.param_dtype not in ("float32", "bfloat16"):
            raise DumeError(f"param_dtype must be float32 or bfloat16, got {self.param_dtype!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise DumeError("steps, batch size and gradient accumulation must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DumeError(f"learning rate must be positive, got {self.lr}")
        if self.warmup < 0 or self.warmup > self.steps:
            raise DumeError(f"warmup ({self.warmup}) must be between 0 and steps ({self.steps})")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.start_ratio + (1 - cfg.start_ratio) * step / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.final_ratio + (1 - cfg.final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def windows_budget(cfg: TrainConfig) -> int:
    """Training windows a run of `cfg` consumes over all processes: what to tokenize."""
    return cfg.steps * cfg.batch_size * cfg.grad_accum * world_size()


def plain_module(accelerator, model):
    """The trained module without accelerate's (DDP) or torch.compile's wrappers.

    `keep_torch_compile=False` matters: with accelerate's default (True), `unwrap_model` of a compiled DDP model
    re-points the compiled wrapper's `_orig_mod` at the inner module, so every later training step through that
    wrapper skips DDP -- no gradient all-reduce, processes silently diverge after the first validation. The plain
    module also has the plain state-dict keys (no `_orig_mod.` prefix)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def _has_padding(dataset) -> bool:
    """Whether any training window has padding: `TokenWindows` knows (`padded`), a pair of tensors is looked at,
    anything else is assumed to."""
    if isinstance(getattr(dataset, "padded", None), bool):
        return dataset.padded
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return not bool(dataset.tensors[1].all())
    return True


def _batches_forever(loader):
    while True:
        yield from loader


@torch.no_grad()
def mean_loss(model, input_ids, attention_mask, batch_size: int, accelerator=None) -> float:
    """Token-weighted mean next-token loss over blocks (padding excluded)."""
    was_training = model.training
    model.eval()
    total, count = summed_nll(model, input_ids, attention_mask, batch_size)
    if was_training:
        model.train()
    if count == 0:
        raise DumeError("validation set has no tokens")
    return total / count


def train(model, train_data, val_data, cfg: TrainConfig, *, params=None, desc: str = "train", log=print):
    """Train `model` in place; return (model, history).

    train_data: a Dataset of (input_ids, attention_mask) pairs (`TokenWindows`) or a pair of LongTensors [N, T];
    val_data: a pair of LongTensors or None; params: what to optimise (default: all; BTX/DUME+ pass the gates).

    FSDP is refused: validation, clipping and the best-weights copy act on the module's own parameters, which FSDP
    shards and replaces (v1 validates the still-sharded module; v2's parameters are not those `prepare` returns),
    and it was never run. The paper's models fit one GPU: DDP (`accelerate launch --multi_gpu`) runs them.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, GradientAccumulationPlugin, set_seed

    from dume.runtime.distributed import partial_state
    from dume.train import speed

    cfg.validate()
    fsdp_refusal = (f"{desc}: FSDP is not supported by this training loop (it would validate and clip sharded "
                    "weights); launch with DDP instead: accelerate launch --multi_gpu ...")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise DumeError(fsdp_refusal)
    if world_size() > 1:
        partial_state()  # the process group, with dume's timeout, before the Accelerator shares it
    dataset = TensorDataset(*train_data) if isinstance(train_data, (tuple, list)) else train_data
    if len(dataset) == 0:
        raise DumeError(f"{desc}: no training sequences")
    # Packed windows carry an all-ones mask. It is passed on as None, so attention is plainly causal: eager
    # transformers drops an all-ones mask itself, but under torch.compile it cannot prove it all ones, builds a 4-D
    # mask, and SDPA leaves its flash kernel. Decided once, on the host: a check per step would sync the GPU.
    needs_mask = _has_padding(dataset)
    set_seed(cfg.seed)
    log_with = "wandb" if cfg.wandb_project else None
    # sync_with_dataloader=False: accelerate would otherwise force an optimizer step when the loader wraps
    # mid-accumulation (our loader is endless): extra scheduler steps at every epoch end, the cosine floor reached
    # early, history["lr"] not the LR applied. Steps are counted here, every grad_accum micro-batches, only here.
    accumulation = GradientAccumulationPlugin(num_steps=cfg.grad_accum, sync_with_dataloader=False)
    accelerator = Accelerator(gradient_accumulation_plugin=accumulation, mixed_precision=cfg.mixed_precision,
                              log_with=log_with, cpu=not torch.cuda.is_available())
    if accelerator.distributed_type == DistributedType.FSDP:
        raise DumeError(fsdp_refusal)
    if log_with:
        accelerator.init_trackers(cfg.wandb_project, config=asdict(cfg))
    fast = speed.enable_fast_matmul(accelerator.device)
    if cfg.param_dtype == "bfloat16":
        model.to(torch.bfloat16)

    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(params)
        wanted = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
    if cfg.decay_all:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    else:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    model = model.to(accelerator.device)
    optimizer = speed.make_adamw(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, device=accelerator.device)
    # Stepped by hand once per optimizer step (see the module docstring), never prepared.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=RandomSampler(dataset, generator=generator),
                        drop_last=len(dataset) >= cfg.batch_size * accelerator.num_processes)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model = speed.maybe_compile(model, cfg.compile)
    model.train()
    effective = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    if accelerator.is_main_process:
        log(f"{desc}: effective batch {effective} sequences = {cfg.batch_size} per device x {cfg.grad_accum} "
            f"accumulation x {accelerator.num_processes} processes")

    history = {"config": asdict(cfg), "mixed_precision": str(accelerator.mixed_precision),
               "param_dtype": cfg.param_dtype, "train_loss": [], "val": [], "lr": [], "stopped_early": False,
               "processes": accelerator.num_processes, "effective_batch": effective, "fast_matmul": fast}
    best = (float("inf"), -1, None)
    bad_evals = 0

    def validate(step):
        nonlocal best, bad_evals
        val = mean_loss(plain_module(accelerator, model), *val_data, cfg.batch_size)
        history["val"].append({"step": step, "loss": val})
        if val < best[0]:
            # a host copy of the weights only when early stopping may restore it: ~115 GB for the paper's fp32 MoE
            snapshot = ({k: v.detach().to("cpu", copy=True) for k, v in
                         plain_module(accelerator, model).state_dict().items()} if cfg.patience else None)
            best = (val, step, snapshot)
            bad_evals = 0
        else:
            bad_evals += 1
        return val

    start = time.time()
    tokens = 0
    batches = _batches_forever(loader)
    bar = tqdm(range(cfg.steps), desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    have_val = val_data is not None and len(val_data[0]) > 0
    val = validate(0) if have_val and cfg.patience else None
    loss_scale = cfg.grad_accum if cfg.sum_accumulated_loss else 1  # accelerate divides by grad_accum
    step = 0
    for step in bar:
        running = 0.0
        history["lr"].append(scheduler.get_last_lr()[0])  # the LR this optimizer step uses
        for _ in range(cfg.grad_accum):
            ids, mask = next(batches)
            with accelerator.accumulate(model):
                labels = ids.masked_fill(mask == 0, -100)
                loss = model(input_ids=ids, attention_mask=mask if needs_mask else None, labels=labels).loss
                accelerator.backward(loss * loss_scale)
                if accelerator.sync_gradients and cfg.clip:
                    accelerator.clip_grad_norm_(params, cfg.clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.item() / cfg.grad_accum
            tokens += int(mask.sum()) * accelerator.num_processes
        history["train_loss"].append(running)
        if log_with:
            accelerator.log({"train/loss": running, "lr": history["lr"][-1]}, step=step)
        if have_val and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            val = validate(step + 1)
            if log_with:
                accelerator.log({"val/loss": val}, step=step)
            if cfg.patience and bad_evals >= cfg.patience:
                history["stopped_early"] = True
                log(f"{desc}: validation loss stopped improving; stopping at step {step + 1}, "
                    f"keeping step {best[1]} (val {best[0]:.4f})")
                break
        bar.set_postfix(loss=f"{running:.3f}", val=f"{val:.3f}" if val is not None else "-")
    bar.close()
    if have_val:
        validate(step + 1)
        if cfg.patience and best[2] is not None and best[1] != step + 1:
            plain_module(accelerator, model).load_state_dict(best[2])
        history["best_val"] = {"step": best[1], "loss": best[0]}
    history["steps_done"] = step + 1
    history["seconds"] = time.time() - start
    history["tokens_per_second"] = tokens / max(history["seconds"], 1e-9)
    if log_with:
        accelerator.end_training()
    if not all(math.isfinite(x) for x in history["train_loss"]):
        raise DumeError(f"{desc}: the training loss became non-finite (lr {cfg.lr} too high?); nothing was saved")
    out = plain_module(accelerator, model)
    # Mixed precision put an autocast forward, a method bound to the module, in the module's own __dict__: a
    # reference cycle that kept the trained model (its GPU memory too) alive after `del` until the next garbage
    # collection, and made later forward calls autocast. The class's own forward again.
    if out.__dict__.pop("_original_forward", None) is not None:
        out.__dict__.pop("forward", None)
    for p in out.parameters():
        p.requires_grad_(True)
    return out, history

