"""mergekit's prompt-based "hidden" gate, reproduced as an ecosystem baseline.

What `mergekit-moe` does with `gate_mode: hidden` (read in mergekit 0.1.5, `mergekit/moe/router.py`:
`get_gate_params`, `get_hidden_states`, `tokenize_prompts`): each expert comes with a few positive prompts; every
prompt is run through the *base model* with the BOS token prepended; the residual stream entering each layer
(`hidden_states[l]`, l = 0 .. L-1, so layer 0 sees the embeddings) at the prompt's last token is averaged over the
expert's prompts and normalised to unit length; that vector is the expert's router row at that layer. No
temperature, no data beyond the prompts.

Differences from mergekit: prompts are run one at a time, so "the last token" is the last real one; mergekit
batches an expert's prompts padded on the LEFT (`mergekit/scripts/moe.py` `build` sets `tokenizer.padding_side =
"left"` and pads with BOS before `tokenize_prompts` pads), so its last position is a real token too and the two
agree. It loads the base model in bf16 (`get_gate_params`: `torch_dtype=torch.bfloat16`), we in float32: on the
wiki set's seed 0 our gates match the real tool's to cosine 0.99998, and to 4.5e-8 when its load is made float32
(`clm_routers_study.py --peers mergekit` runs the real tool: `dume.routers.mergekit_moe`). No negative prompts. The base model is the one the
experts were fine-tuned from (the CLM run's seed model), like mergekit's `base_model`; else their average.
"""

from __future__ import annotations

import torch

from dume.errors import DumeError


@torch.no_grad()
def prompt_hidden_gates(base_model_dir, tokenizer, prompts: dict[str, list[str]], domains, *,
                        device: str = "cpu") -> list[torch.Tensor]:
    """[D, H] float32 router weights per layer, row e from `prompts[domains[e]]`."""
    from dume.train.models import load_model

    model = load_model(base_model_dir).to(device).eval()
    rows = []
    for d in domains:
        texts = [p for p in prompts.get(d, []) if p.strip()]
        if not texts:
            raise DumeError(f"the hidden gate needs at least one prompt for {d!r}")
        acc = None
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            if tokenizer.bos_token_id is not None:
                ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
            out = model(input_ids=ids.to(device), output_hidden_states=True)
            last = torch.stack([h[0, -1].double() for h in out.hidden_states[:-1]])  # [L, H]
            acc = last if acc is None else acc + last
        mean = acc / len(texts)
        rows.append(mean / mean.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    gates = torch.stack(rows, dim=1)  # [L, D, H]
    return [g.to(torch.float32).contiguous() for g in gates]


def first_prompts(docs, tokenizer, count: int = 8, max_tokens: int = 64) -> list[str]:
    """A user's handful of prompts, stood in for by the first `count` documents of the domain's training text,
    each cut to its first `max_tokens` tokens."""
    out = []
    for text in docs:
        ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
        if ids:
            out.append(tokenizer.decode(ids))
        if len(out) == count:
            break
    return out
