"""A checkpoint's own forward over many blocks without holding the model: one decoder layer in memory at a time.

The model is made on the meta device; its embedding and final norm are filled from the checkpoint, and each
decoder layer is filled just before it runs (over every block, `batch_size` rows at a time) and emptied after. The
peak is one layer plus the blocks' hidden states (tokens × hidden), not the model: loading four Llama-3.2-1B
experts' MoE whole took 14.6 GB in float32 (issue 23). The model's own forward builds the masks and rotary
embeddings, so nothing of the architecture is re-implemented; `tests/test_architectures.py` and
`tests/test_evaluate_report.py` check the routing shares and perplexities equal the loaded model's.

Dense checkpoints (experts, model averaging) run the same way: their tensors are filled by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch


class _LayerRun(torch.nn.Module):
    """Stands in for decoder layer `index` inside the model's forward: fills the real layer, runs it over the hidden
    states `batch_size` rows at a time, hands its router's logits to `on_router_logits`, and empties it again."""

    def __init__(self, index: int, layer, fill, batch_size: int, on_router_logits):
        super().__init__()
        self.index, self.batch_size = index, batch_size
        self._layer, self._fill, self._on = [layer], fill, on_router_logits  # a list: not a registered submodule

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        layer = self._fill(self.index, self._layer[0], hidden_states.device)
        logits, hook = [], None
        if self._on is not None:
            hook = layer.mlp.gate.register_forward_hook(
                lambda m, a, out: logits.append(out[0] if isinstance(out, tuple) else out))
        outs = []
        try:
            for i in range(0, len(hidden_states), self.batch_size):
                mask = attention_mask[i:i + self.batch_size] if isinstance(attention_mask, torch.Tensor) else None
                outs.append(layer(hidden_states[i:i + self.batch_size], attention_mask=mask, **kwargs))
        finally:
            if hook is not None:
                hook.remove()
            layer.to("meta")
        if self._on is not None:
            self._on(self.index, logits)
        return torch.cat(outs)


def _open(model_dir: Path):
    """(config, MoE architecture record or None for a dense checkpoint)."""
    from dume.arch.table import ARCHITECTURES, MOE_TYPES, moe_architecture
    from dume.checkpoint.io import is_complete_checkpoint, read_json
    from dume.checkpoint.reader import load_config
    from dume.errors import DumeError

    if not is_complete_checkpoint(model_dir):
        raise DumeError(f"{model_dir} is not a complete checkpoint (config.json + safetensors weights)")
    kind = read_json(model_dir / "config.json").get("model_type")
    if kind in MOE_TYPES:
        cfg = load_config(model_dir, kind)
        return cfg, moe_architecture(cfg)
    return load_config(model_dir, tuple(ARCHITECTURES)), None


@torch.no_grad()
def streamed_forward(model_dir, input_ids, attention_mask, *, batch_size: int = 8, device: str = "cpu", dtype=None,
                     on_router_logits: Callable | None = None, on_logits: Callable | None = None,
                     gates: Sequence[torch.Tensor] | None = None) -> None:
    """Run the checkpoint at `model_dir` over all rows of (input_ids, attention_mask) ([N, L]), layer by layer.

    `on_router_logits(layer, [router logits per row batch])` sees each MoE layer's router; `on_logits(start,
    logits)` sees the next-token logits of the rows from `start` on, a few at a time (the lm_head runs only when it
    is given);
    `gates` (one [D, H] per layer) replace the checkpoint's routers, so another router is evaluated without writing
    a second MoE. `dtype` defaults to the checkpoint's stored one."""
    from transformers import AutoModelForCausalLM

    from dume.checkpoint.reader import CheckpointReader, majority_dtype
    from dume.errors import DumeError
    from dume.moe.edit import fill_parameters

    model_dir = Path(model_dir)
    cfg, arch = _open(model_dir)
    if (gates is not None or on_router_logits is not None) and arch is None:
        raise DumeError(f"{model_dir} is a dense checkpoint: it has no routers to read or replace")
    if gates is not None and len(gates) != cfg.num_hidden_layers:
        raise DumeError(f"{len(gates)} gates for the {cfg.num_hidden_layers} layers of {model_dir}")
    with CheckpointReader(model_dir) as rd:
        dtype = dtype or majority_dtype(rd.dtype(n) for n in rd.keys())

        def fill(index: int, layer, where):
            layer.to_empty(device="cpu")
            fill_parameters(((f"model.layers.{index}.{n}", p) for n, p in layer.named_parameters()), rd, model_dir,
                            cfg, arch)
            if gates is not None:
                router = layer.mlp.gate.weight
                if tuple(gates[index].shape) != tuple(router.shape):
                    raise DumeError(f"gate {index} has shape {list(gates[index].shape)}, the router "
                                    f"{list(router.shape)}")
                router.copy_(gates[index])
            return layer.to(where).eval()

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        base = model.model
        for prefix, module in (("model.embed_tokens", base.embed_tokens), ("model.norm", base.norm)):
            module.to_empty(device="cpu")
            fill_parameters(((f"{prefix}.{n}", p) for n, p in module.named_parameters()), rd, model_dir, cfg, arch)
            module.to(device)
        head = None
        if on_logits is not None:
            tied = getattr(cfg, "tie_word_embeddings", False) or "lm_head.weight" not in rd
            head = base.embed_tokens.weight if tied else rd.get("lm_head.weight").to(device=device, dtype=dtype)
        base.rotary_emb = type(base.rotary_emb)(config=cfg).to(device)
        base.layers = torch.nn.ModuleList(_LayerRun(i, layer, fill, batch_size, on_router_logits)
                                          for i, layer in enumerate(base.layers))
        base.eval()
        hidden = base(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                      use_cache=False).last_hidden_state
    if head is not None:
        # logits in row chunks of at most ~256 MB: 8 rows x 512 tokens x a 152k vocabulary (Qwen3) are 2.5 GB in
        # float32, and the NLL makes two more of them
        rows = max(1, min(batch_size, 2**26 // max(1, hidden.shape[1] * head.shape[0])))
        for i in range(0, len(hidden), rows):
            on_logits(i, torch.nn.functional.linear(hidden[i:i + rows], head))
