import pytest
import torch

from dume.errors import DumeError
from dume.train.loop import TrainConfig, lr_factor, mean_loss, train
from tests.helpers import tiny_llama


def _data(n, T=24, vocab=40, seed=0):
    # A learnable pattern: each sequence counts up modulo a small vocabulary.
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    ids = (start + torch.arange(T)) % vocab
    return ids, torch.ones_like(ids)


def test_schedule_is_warmup_from_tenth_then_cosine_to_tenth():
    cfg = TrainConfig(steps=100, warmup=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.55)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert all(lr_factor(s, cfg) >= lr_factor(s + 1, cfg) for s in range(10, 100))


def test_tiny_training_lowers_validation_loss():
    model = tiny_llama(vocab_size=40)
    train_data, val_data = _data(64), _data(16, seed=1)
    before = mean_loss(model, *val_data, batch_size=8)
    cfg = TrainConfig(lr=3e-3, steps=30, warmup=3, batch_size=8, eval_every=10)
    model, history = train(model, train_data, val_data, cfg, desc="t")
    after = mean_loss(model, *val_data, batch_size=8)
    assert after < before - 0.5, (before, after)
    assert history["val"][-1]["loss"] == pytest.approx(after, rel=1e-5)
    assert history["steps_done"] == 30


def test_only_given_params_train():
    model = tiny_llama(vocab_size=40)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    head = [model.lm_head.weight]
    model, _ = train(model, _data(32), _data(8, seed=1), TrainConfig(steps=3, warmup=0, batch_size=8), params=head)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v.cpu(), frozen[k])]
    assert changed == ["lm_head.weight"]
    assert all(p.requires_grad for p in model.parameters())


def test_patience_keeps_best_weights():
    model = tiny_llama(vocab_size=40)
    train_data, val_data = _data(64), _data(16, seed=1)
    # An absurd lr makes validation worse; early stopping must keep step 0's weights.
    cfg = TrainConfig(lr=5.0, steps=40, warmup=0, batch_size=8, eval_every=2, patience=2)
    before = mean_loss(model, *val_data, batch_size=8)
    model, history = train(model, train_data, val_data, cfg)
    assert history["stopped_early"]
    assert mean_loss(model, *val_data, batch_size=8) <= before + 1e-6


def test_bad_config_is_refused():
    with pytest.raises(DumeError):
        TrainConfig(lr=-1).validate()
    with pytest.raises(DumeError):
        TrainConfig(steps=5, warmup=10).validate()


def test_accumulation_stays_in_step_when_the_data_wraps():
    """3 batches per epoch, 2 micro-batches per step: the loader wraps inside steps 2 and 5.
    accelerate's default (sync_with_dataloader) forced an extra optimizer and scheduler
    step there, so the LR ran ahead of the schedule (issue 22, item 7)."""
    model = tiny_llama(vocab_size=40)
    cfg = TrainConfig(lr=1e-3, steps=9, warmup=2, batch_size=8, grad_accum=2, eval_every=0)
    _, history = train(model, _data(24), None, cfg)
    assert history["lr"] == pytest.approx([1e-3 * lr_factor(s, cfg) for s in range(9)], rel=1e-12)
    assert history["steps_done"] == 9


def test_no_weight_snapshots_without_early_stopping():
    """Best-weights copies are only needed to restore them (patience > 0); they were taken
    at every improving validation (issue 22, item 10)."""
    model = tiny_llama(vocab_size=40)
    calls = []
    real = model.state_dict
    model.state_dict = lambda *a, **k: calls.append(1) or real(*a, **k)
    train(model, _data(32), _data(8, seed=1), TrainConfig(steps=4, warmup=0, batch_size=8, eval_every=1, patience=0))
    assert not calls
    model = tiny_llama(vocab_size=40)
    real2 = model.state_dict
    model.state_dict = lambda *a, **k: calls.append(1) or real2(*a, **k)
    train(model, _data(32), _data(8, seed=1), TrainConfig(steps=4, warmup=0, batch_size=8, eval_every=1, patience=3))
    assert calls  # with early stopping the snapshot is taken


def _moved_fraction(param_dtype: str) -> float:
    model = tiny_llama(vocab_size=40)
    stored = torch.float32 if param_dtype == "recipe" else getattr(torch, param_dtype)
    before = model.lm_head.weight.detach().to(stored).float().clone()  # what the weights hold before a step
    cfg = TrainConfig.with_recipe("original", lr=1e-5, steps=4, warmup=0, batch_size=8, eval_every=0,
                                  param_dtype=None if param_dtype == "recipe" else param_dtype)
    model, history = train(model, _data(32), None, cfg, params=[model.lm_head.weight])
    assert history["param_dtype"] == ("float32" if param_dtype == "recipe" else param_dtype)
    return (model.lm_head.weight.detach().float() != before).float().mean().item()


def test_the_original_recipe_keeps_float32_master_weights_so_small_updates_land():
    """lr 1e-5 (DUME+'s) on weights of ~0.02: in bfloat16 weights (the original's cast,
    once this recipe's default) AdamW's updates fall below the bf16 spacing and vanish
    (issue 22, item 6)."""
    assert TrainConfig.with_recipe("original").param_dtype == "float32"
    assert _moved_fraction("recipe") > 0.99
    assert _moved_fraction("bfloat16") < 0.2


def test_mixed_precision_defaults_to_what_accelerate_launch_was_given():
    """The scripts' default used to be "no", which overrode `accelerate launch
    --mixed_precision bf16` (issue 22, item 11). A fresh process: accelerate's state is a
    per-process singleton."""
    import subprocess
    import sys

    code = ("import torch; from dume.train.loop import TrainConfig, train; from tests.helpers import tiny_llama\n"
            "ids = torch.randint(0, 40, (16, 12)); data = (ids, torch.ones_like(ids))\n"
            "cfg = TrainConfig.with_recipe('embedded', steps=1, warmup=0, batch_size=8, eval_every=0, "
            "mixed_precision=None)\n"
            "print(train(tiny_llama(vocab_size=40), data, None, cfg, log=lambda *a: None)[1]['mixed_precision'])\n")
    from pathlib import Path

    import os

    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, env={**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"}, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "bf16", out.stderr[-2000:]


def test_fsdp_is_refused_with_one_line_naming_ddp(monkeypatch):
    """The loop validates and clips the module's own parameters, which FSDP shards:
    `accelerate launch --use_fsdp` is refused before any work, naming DDP."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model = tiny_llama()
    with pytest.raises(DumeError, match=r"FSDP is not supported .*accelerate launch --multi_gpu"):
        train(model, _data(32), None, TrainConfig(steps=1, warmup=0, batch_size=8))


def _masks_seen(train_data):
    model = tiny_llama(vocab_size=40)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    train(model, train_data, None, TrainConfig(steps=2, warmup=0, batch_size=8, eval_every=0))
    return seen


def test_packed_windows_train_without_a_mask_and_padded_ones_with_it():
    """An all-ones mask is passed as None, so attention takes the plain causal path: under torch.compile
    transformers cannot drop an all-ones mask and SDPA leaves flash attention (issue 22, item 11). Without
    compile the two are the same computation: loss and gradients bit-equal."""
    assert _masks_seen(_data(16)) == [None, None]
    ids, mask = _data(16)
    mask[:, -3:] = 0
    assert all(m is not None for m in _masks_seen((ids, mask)))
    model = tiny_llama(vocab_size=40)
    ids, ones = _data(4)
    grads = []
    for m in (ones, None):
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=m, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0]) and all(map(torch.equal, grads[0][1], grads[1][1]))


UNWRAP_CHECK = """
import torch, torch.distributed as dist
from accelerate import Accelerator
from dume.train.loop import plain_module
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
inner = torch.nn.Linear(2, 2)
ddp = torch.nn.parallel.DistributedDataParallel(inner)
acc = Accelerator(cpu=True)
compiled = torch.compile(ddp)  # not called: compiling is lazy, the wrapper is what matters
assert plain_module(acc, compiled) is inner and compiled._orig_mod is ddp
acc.unwrap_model(compiled)  # accelerate's default, what the loop called before
print("default re-points the wrapper:", compiled._orig_mod is inner)
dist.destroy_process_group()
"""


def test_unwrapping_a_compiled_ddp_model_keeps_its_gradient_sync():
    """accelerate's `unwrap_model` (keep_torch_compile=True) re-points a compiled DDP model's `_orig_mod` at the
    inner module, so training after the first validation skipped DDP's all-reduce under --compile. The loop
    unwraps with `plain_module`, which leaves the training wrapper alone (issue 22, item 11)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-c", UNWRAP_CHECK.format(port=port)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "default re-points the wrapper: True" in p.stdout  # the pitfall is real in this accelerate


FREED_CHECK = """
import gc, weakref, torch
from dume.train.loop import TrainConfig, train
from tests.helpers import tiny_llama
ids = torch.randint(0, 40, (16, 12))
model = tiny_llama(vocab_size=40)
ref = weakref.ref(model)
gc.disable()  # only reference counting frees it
out, _ = train(model, (ids, torch.ones_like(ids)), None,
               TrainConfig(steps=2, warmup=0, batch_size=8, eval_every=0, mixed_precision="bf16"), log=lambda *a: None)
print("instance forward:", "forward" in out.__dict__)
del model, out
print("alive after del:", ref() is not None)
"""


def test_a_trained_model_is_freed_by_del_alone():
    """accelerate's bf16 autocast forward, bound to the module and kept in its own __dict__, made a reference
    cycle: after training, `del model` freed nothing (GPU memory held while lm-eval loaded the next model) until
    a garbage collection (issue 22, item 10). It is removed before `train` returns; forward is the class's.
    A fresh process: accelerate's state (mixed precision) is a per-process singleton."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", FREED_CHECK], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-2:] == ["instance forward: False", "alive after del: False"], out.stdout
