"""One training loop for everything that trains: the seed model, the experts, and the
routers of BTX and DUME+.

It runs on `accelerate`, so the same code is single-process on this CPU and DDP/FSDP
with bf16 autocast under `accelerate launch` on GPUs. The schedule is the paper's:
linear warmup from 0.1x to the peak learning rate, then cosine down to 0.1x. Small
domains stop on validation loss (patience) and keep their best weights, because an
expert that overfits its few thousand tokens drifts away from the seed and ruins
MoErging (DESIGN.md §4).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from tqdm.auto import tqdm

from .errors import DumeError


@dataclass
class TrainConfig:
    lr: float = 3e-3
    steps: int = 100                 # optimizer steps
    warmup: int = 10
    batch_size: int = 16             # sequences per micro-batch
    grad_accum: int = 1
    weight_decay: float = 0.1
    clip: float = 1.0
    start_ratio: float = 0.1         # warmup starts at start_ratio * lr
    final_ratio: float = 0.1         # cosine ends at final_ratio * lr
    eval_every: int = 50             # steps between validations (0: only at the end)
    patience: int = 0                # evaluations without improvement before stopping (0: never stop)
    seed: int = 0
    mixed_precision: str = "no"      # "bf16" on GPUs
    wandb_project: str | None = None  # off unless asked
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
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


def _batches_forever(loader):
    while True:
        yield from loader


@torch.no_grad()
def mean_loss(model, input_ids, attention_mask, batch_size: int, accelerator=None) -> float:
    """Token-weighted mean next-token loss over blocks (padding excluded)."""
    from .evaluate import token_nll

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(input_ids), batch_size):
        ids = input_ids[i:i + batch_size].to(device)
        mask = attention_mask[i:i + batch_size].to(device)
        nll, n = token_nll(model, ids, mask)
        total += nll
        count += n
    if was_training:
        model.train()
    if count == 0:
        raise DumeError("validation set has no tokens")
    return total / count


def train(model, train_data, val_data, cfg: TrainConfig, *, params=None, desc: str = "train", log=print):
    """Train `model` in place; return a history dict.

    train_data / val_data: (input_ids, attention_mask) LongTensors [N, T].
    params: the parameters to optimise (default: all). BTX/DUME+ pass only the gates.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg.validate()
    if len(train_data[0]) == 0:
        raise DumeError(f"{desc}: no training sequences")
    set_seed(cfg.seed)
    log_with = "wandb" if cfg.wandb_project else None
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision=cfg.mixed_precision, log_with=log_with)
    if log_with:
        accelerator.init_trackers(cfg.wandb_project, config=asdict(cfg))

    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(params)
        wanted = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    generator = torch.Generator().manual_seed(cfg.seed)
    dataset = TensorDataset(*train_data)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=RandomSampler(dataset, generator=generator),
                        drop_last=len(dataset) >= cfg.batch_size)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()

    history = {"config": asdict(cfg), "train_loss": [], "val": [], "stopped_early": False}
    best = (float("inf"), -1, None)
    bad_evals = 0

    def validate(step):
        nonlocal best, bad_evals
        val = mean_loss(accelerator.unwrap_model(model), *val_data, cfg.batch_size)
        history["val"].append({"step": step, "loss": val})
        if val < best[0]:
            best = (val, step, copy.deepcopy({k: v.detach().cpu() for k, v in
                                              accelerator.unwrap_model(model).state_dict().items()}))
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
    step = 0
    for step in bar:
        running = 0.0
        for _ in range(cfg.grad_accum):
            ids, mask = next(batches)
            with accelerator.accumulate(model):
                labels = ids.masked_fill(mask == 0, -100)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.clip:
                    accelerator.clip_grad_norm_(params, cfg.clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.item() / cfg.grad_accum
            tokens += int(mask.sum())
        history["train_loss"].append(running)
        if log_with:
            accelerator.log({"train/loss": running, "lr": scheduler.get_last_lr()[0]}, step=step)
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
            accelerator.unwrap_model(model).load_state_dict(best[2])
        history["best_val"] = {"step": best[1], "loss": best[0]}
    history["steps_done"] = step + 1
    history["seconds"] = time.time() - start
    history["tokens_per_second"] = tokens / max(history["seconds"], 1e-9)
    if log_with:
        accelerator.end_training()
    for p in model.parameters():
        p.requires_grad_(True)
    return accelerator.unwrap_model(model), history
