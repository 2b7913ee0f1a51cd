"""Which dense experts can be MoErged, and into what: the architecture table (docs/design.md §8).

One record per supported dense architecture: which tensors are shared (averaged) and which are the MLP (one
expert per dense model), the tensor names the MoE class's `save_pretrained` writes for experts and routers, and
how the MoE config is derived from the dense one. Nothing else in `dume` branches on the architecture.

| dense (`model_type`) | MoE                     | expert tensors                                   | router            |
|----------------------|-------------------------|--------------------------------------------------|-------------------|
| llama                | MixtralForCausalLM      | block_sparse_moe.experts.E.w1/w3/w2 (gate/up/down) | block_sparse_moe.gate |
| mistral              | MixtralForCausalLM      | same                                             | same              |
| qwen3                | Qwen3MoeForCausalLM     | mlp.experts.E.gate_proj/up_proj/down_proj        | mlp.gate          |
| phi3 (fused qkv, gate_up) | MixtralForCausalLM | as llama, from the split parts                 | as llama          |

Routing: Mixtral takes the top-k router logits and softmaxes over them; Qwen3-MoE softmaxes over all experts,
takes the top-k and (with `norm_topk_prob`, set here) renormalises them: the same routing for the same gates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from dume.errors import DumeError

# Config fields that must be identical across experts for their tensors to be combined (a field a config class
# lacks reads as None on every expert).
MUST_MATCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters",
                     "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
                     "max_window_layers", "layer_types")
# Fields that may differ harmlessly (expert 0's value is used); a difference is noted.
MAY_DIFFER_FIELDS = ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
# Runtime settings carried into the MoE config.
RUNTIME_FIELDS = ("initializer_range", "attention_dropout", "use_cache")

_DENSE_MLP = r"^model\.layers\.(?P<layer>\d+)\.mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<kind>weight|bias)$"
_COMMON_SHARED = (r"^model\.embed_tokens\.weight$", r"^model\.norm\.weight$", r"^lm_head\.weight$",
                  r"^model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight$",
                  r"^model\.layers\.\d+\.(input|post_attention)_layernorm\.weight$")


@dataclass(frozen=True)
class Architecture:
    dense_type: str                     # config.json model_type of the experts
    dense_class: str                    # transformers class of an expert (and of the oracle)
    moe_type: str
    moe_class: str
    shared: tuple[str, ...]             # regexes of the tensors every expert shares (averaged)
    expert_name: str                    # MoE expert tensor: {layer} {expert} {w}
    expert_proj: dict[str, str]         # dense MLP projection -> {w} in expert_name
    gate_name: str                      # MoE router tensor as written: {layer}
    moe_defaults: dict[str, Any] = field(default_factory=dict)
    num_experts_field: str = "num_local_experts"
    expert_size_field: str = "intermediate_size"   # the MoE config field holding one expert's width
    mlp_pattern: str = _DENSE_MLP
    dropped: tuple[str, ...] = (r"\.rotary_emb\.inv_freq$",)
    # Fused projections stored as one tensor (Phi-3's qkv_proj, gate_up_proj): config -> {name after
    # "model.layers.N.": ((part, rows), ...)}; the MoE is built from the parts (docs/design.md §8).
    split: Callable[[Any], dict[str, tuple[tuple[str, int], ...]]] | None = None
    # Why experts with this config cannot become the MoE, beyond biases (or None).
    refuse: Callable[[Any], str | None] | None = None

    @property
    def incompatible_flags(self) -> tuple[str, ...]:
        """Dense config flags the MoE class cannot hold (Mixtral has no bias; Qwen3-MoE keeps attention's)."""
        return ("attention_bias", "mlp_bias") if self.moe_type == "mixtral" else ("mlp_bias",)

    def moe_refusal(self, dense_config) -> str | None:
        """Why experts with `dense_config` cannot be MoErged into this MoE class (or None)."""
        for flag in self.incompatible_flags:
            if getattr(dense_config, flag, False):
                return f"{flag}=True: a {self.moe_class} has no such biases"
        return self.refuse(dense_config) if self.refuse else None

    def row_views(self, names, dense_config) -> dict[str, tuple[str, int, int]]:
        """Each part of a fused tensor among `names` -> (stored name, first row, end row), for
        `CheckpointReader(row_views=...)`; {} for an architecture without fused tensors."""
        parts_of = self.split(dense_config) if self.split else {}
        views = {}
        for name in names:
            m = re.match(r"^(model\.layers\.\d+\.)(.+)\.weight$", name)
            if m and m[2] in parts_of:
                start = 0
                for part, rows in parts_of[m[2]]:
                    views[f"{m[1]}{part}.weight"] = (name, start, start + rows)
                    start += rows
        return views

    def mlp_match(self, name: str):
        return re.match(self.mlp_pattern, name)

    def kind_of(self, name: str) -> str:
        """'mlp', 'shared', 'dropped' or 'unknown' for one of the dense experts' tensors."""
        if self.mlp_match(name):
            return "mlp"
        if any(re.search(p, name) for p in self.dropped):
            return "dropped"
        if any(re.match(p, name) for p in self.shared):
            return "shared"
        return "unknown"

    def expert_tensor(self, layer: int, expert: int, proj: str) -> str:
        return self.expert_name.format(layer=layer, expert=expert, w=self.expert_proj[proj])

    def moe_kind_of(self, name: str):
        """For a tensor of this architecture's MoE checkpoint (as written): ("expert", layer, expert, dense
        projection), ("router", layer) or ("shared",)."""
        m = _template_regex(self.expert_name).match(name)
        if m and m["w"] in self._proj_of_w:
            return ("expert", int(m["layer"]), int(m["expert"]), self._proj_of_w[m["w"]])
        m = _template_regex(self.gate_name).match(name)
        if m:
            return ("router", int(m["layer"]))
        return ("shared",)

    @property
    def _proj_of_w(self) -> dict[str, str]:
        return {w: proj for proj, w in self.expert_proj.items()}

    def dense_mlp_name(self, layer: int, proj: str) -> str:
        return f"model.layers.{layer}.mlp.{proj}.weight"

    def dense_config(self, moe_config):
        """The dense config of "shared weights + one expert's MLPs" of a MoE built by `moe_config`: its inverse
        (every architectural field copied back, the expert width as `intermediate_size`, no bias the MoE lacks)."""
        cls = self.config_class(moe=False)
        kwargs = _shared_fields(moe_config, cls)
        kwargs["intermediate_size"] = getattr(moe_config, self.expert_size_field)
        kwargs.update({flag: False for flag in self.incompatible_flags if flag in _known_fields(cls)})
        return _finish(cls(**kwargs), moe_config, self.dense_class)

    def config_class(self, moe: bool):
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[self.moe_type if moe else self.dense_type]

    def model_class(self, moe: bool):
        import transformers

        return getattr(transformers, self.moe_class if moe else self.dense_class)

    def moe_config(self, dense_config, num_experts: int, num_experts_per_tok: int):
        """The MoE config whose model computes what the MoErged experts compute: every architectural field copied
        (rope parameters of any type, head_dim, GQA, tied embeddings, sliding window), plus the MoE fields."""
        why = self.moe_refusal(dense_config)
        if why:
            raise DumeError(f"{why}, so these experts cannot be MoErged (model averaging still works)")
        cls = self.config_class(moe=True)
        kwargs = {f: v for f, v in _shared_fields(dense_config, cls).items() if f not in self.incompatible_flags}
        kwargs[self.expert_size_field] = dense_config.intermediate_size
        kwargs["intermediate_size"] = dense_config.intermediate_size
        kwargs.update(self.moe_defaults)
        kwargs[self.num_experts_field] = num_experts
        kwargs["num_experts_per_tok"] = num_experts_per_tok
        return _finish(cls(**kwargs), dense_config, self.moe_class)


def _known_fields(config_class) -> set[str]:
    return set(config_class().to_dict()) | {"rope_parameters", "head_dim", "layer_types"}


def _shared_fields(source_config, config_class) -> dict:
    """The architectural fields of `source_config` that `config_class` knows (rope parameters copied)."""
    known = _known_fields(config_class)
    kwargs = {f: getattr(source_config, f) for f in (*MUST_MATCH_FIELDS, *MAY_DIFFER_FIELDS, *RUNTIME_FIELDS)
              if hasattr(source_config, f) and f in known}
    if isinstance(kwargs.get("rope_parameters"), dict):
        kwargs["rope_parameters"] = dict(kwargs["rope_parameters"])
    return kwargs


def _finish(cfg, source_config, class_name: str):
    """The source's dtype and the class name recorded on a derived config."""
    dtype = getattr(source_config, "dtype", None)
    if dtype is not None:
        cfg.dtype = dtype
    cfg.architectures = [class_name]
    return cfg


# A DUME MoE is a plain inference model: no router jitter or aux loss, and (for Mixtral) no sliding window unless
# the experts have one.
_MIXTRAL = dict(moe_type="mixtral", moe_class="MixtralForCausalLM",
                expert_name="model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight",
                expert_proj={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
                gate_name="model.layers.{layer}.block_sparse_moe.gate.weight",
                moe_defaults={"output_router_logits": False, "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.0})

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(dense_type="llama", dense_class="LlamaForCausalLM", shared=_COMMON_SHARED,
                          **{**_MIXTRAL, "moe_defaults": {**_MIXTRAL["moe_defaults"], "sliding_window": None}}),
    "mistral": Architecture(dense_type="mistral", dense_class="MistralForCausalLM", shared=_COMMON_SHARED,
                            **_MIXTRAL),
    "qwen3": Architecture(
        dense_type="qwen3", dense_class="Qwen3ForCausalLM", moe_type="qwen3_moe", moe_class="Qwen3MoeForCausalLM",
        shared=_COMMON_SHARED + (r"^model\.layers\.\d+\.self_attn\.(q|k)_norm\.weight$",),
        expert_name="model.layers.{layer}.mlp.experts.{expert}.{w}.weight",
        expert_proj={"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
        gate_name="model.layers.{layer}.mlp.gate.weight",
        moe_defaults={"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                      "output_router_logits": False, "router_aux_loss_coef": 0.0},
        num_experts_field="num_experts", expert_size_field="moe_intermediate_size"),
    # Phi-3 stores q/k/v and gate/up fused; the Mixtral takes the parts (Phi3MLP chunks gate_up_proj as gate, then
    # up). Its LayerNorms are RMSNorms, so it is Llama once split.
    "phi3": Architecture(dense_type="phi3", dense_class="Phi3ForCausalLM",
                         shared=_COMMON_SHARED + (r"^model\.layers\.\d+\.self_attn\.qkv_proj\.weight$",),
                         mlp_pattern=_DENSE_MLP.replace("(?P<proj>", "(?P<proj>gate_up_proj|"),
                         split=lambda c: {"self_attn.qkv_proj": tuple(
                                              (f"self_attn.{p}_proj", n * (c.hidden_size // c.num_attention_heads))
                                              for p, n in (("q", c.num_attention_heads), ("k", c.num_key_value_heads),
                                                           ("v", c.num_key_value_heads))),
                                          "mlp.gate_up_proj": (("mlp.gate_proj", c.intermediate_size),
                                                               ("mlp.up_proj", c.intermediate_size))},
                         refuse=lambda c: None if (c.rope_parameters or {}).get("partial_rotary_factor", 1.0) == 1.0
                         else "partial_rotary_factor < 1: a Mixtral rotates every dimension of a head",
                         **_MIXTRAL),
}
# Which dense record a MoE checkpoint is read back as (its experts' dense class): the first record per MoE type;
# a Mixtral with a sliding window reads back as Mistral.
MOE_TYPES = {a.moe_type: a for a in reversed(ARCHITECTURES.values())}

_REGEX_CACHE: dict[str, re.Pattern] = {}


def _template_regex(template: str) -> re.Pattern:
    """`model.layers.{layer}.x.{expert}.{w}.weight` -> a compiled regex with named groups."""
    if template not in _REGEX_CACHE:
        pattern = re.escape(template)
        for key, group in (("layer", r"(?P<layer>\d+)"), ("expert", r"(?P<expert>\d+)"), ("w", r"(?P<w>\w+)")):
            pattern = pattern.replace(re.escape("{" + key + "}"), group)
        _REGEX_CACHE[template] = re.compile(f"^{pattern}$")
    return _REGEX_CACHE[template]


# The MoE classes' in-memory names (fused experts, routers) as `state_dict()` gives them.
_IN_MEMORY_ROUTED = r"^model\.layers\.\d+\.mlp\.(experts\.|gate\.)"


def is_routed(name: str) -> bool:
    """True for the tensors MoErging does not share: a dense MLP of any supported architecture, a MoE checkpoint's
    experts and routers as written, a MoE model's in-memory ones. Everything else (embeddings, attention, norms)
    is shared. The one answer every module uses (fingerprints, merges, edits)."""
    if re.match(_IN_MEMORY_ROUTED, name):
        return True
    for a in ARCHITECTURES.values():
        if a.mlp_match(name) or a.moe_kind_of(name)[0] != "shared":
            return True
    return False


# Names a router may be stored under when reading (written names first, then in-memory ones).
GATE_NAMES = tuple(dict.fromkeys([a.gate_name for a in ARCHITECTURES.values()]
                                 + ["model.layers.{layer}.mlp.gate.weight"]))


def supported() -> str:
    return ", ".join(f"{a.dense_class} ({t}) -> {a.moe_class}" for t, a in ARCHITECTURES.items())


def architecture(dense_type: str | None) -> Architecture:
    """The record for experts of `model_type` dense_type; a clear error otherwise."""
    if dense_type not in ARCHITECTURES:
        raise DumeError(f"model_type {dense_type!r} is not supported; supported architectures: {supported()}")
    return ARCHITECTURES[dense_type]


def moe_architecture(moe_type_or_config) -> Architecture:
    """The record a MoE checkpoint belongs to, from its `model_type` or its config (a Mixtral config with a sliding
    window is Mistral's)."""
    moe_type = getattr(moe_type_or_config, "model_type", moe_type_or_config)
    if moe_type == "mixtral" and getattr(moe_type_or_config, "sliding_window", None):
        return ARCHITECTURES["mistral"]
    if moe_type not in MOE_TYPES:
        raise DumeError(f"model_type {moe_type!r} is not a supported MoE; supported: "
                        f"{', '.join(a.moe_class + ' (' + t + ')' for t, a in MOE_TYPES.items())}")
    return MOE_TYPES[moe_type]
