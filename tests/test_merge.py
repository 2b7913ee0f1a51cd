"""Merging: averaging, MoErging into Mixtral, oracles, and refusing bad experts.

Tiny Llama experts (hidden 32, 2 layers) derived from one seed model by per-expert
perturbations, saved with `save_pretrained` like real experts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from dume.checkpoint.reader import CheckpointReader
from dume.checkpoint.experts import check_experts, shared_weights_fingerprint
from dume.errors import DumeError
from dume.moe.merge import (average_experts, build_oracle_model, moe_config, moerge_experts, oracle_state_dict,
    shared_state_dict, write_oracle)
from dume.moe.edit import load_moe, read_gates, set_gates

D = 3
TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def make_tokenizer(path: Path, reverse: bool = False) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(95)]
    if reverse:
        words = words[::-1]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["[UNK]"], vocab["[PAD]"] = 95, 96
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)


def make_experts(root: Path, n: int = D, tokenizer: bool = True, **overrides) -> list[Path]:
    """n experts = one seed model + a per-expert random perturbation of every tensor."""
    torch.manual_seed(1234)
    seed = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    dirs = []
    for e in range(n):
        m = copy.deepcopy(seed)
        g = torch.Generator().manual_seed(100 + e)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        d = root / f"expert{e}"
        m.save_pretrained(d)
        if tokenizer:
            make_tokenizer(d)
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> list[Path]:
    return make_experts(tmp_path_factory.mktemp("experts"))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(7))


def random_gates(seed: int = 0, d: int = D, h: int = 32, layers: int = 2, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(d, h, generator=g) for _ in range(layers)]


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------- a reference forward


class ReferenceRoutedMLP(torch.nn.Module):
    """Softmax over W x, top-k, renormalise, sum of the chosen dense Llama MLPs."""

    def __init__(self, gate: torch.Tensor, mlps: list[torch.nn.Module], k: int):
        super().__init__()
        self.gate, self.mlps, self.k = gate, mlps, k
        self.chosen: set[int] = set()

    def forward(self, x):
        probs = torch.softmax(x @ self.gate.T, dim=-1)
        w, idx = torch.topk(probs, self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        self.chosen |= set(idx.unique().tolist())
        out = torch.zeros_like(x)
        for j in range(self.k):
            for e, mlp in enumerate(self.mlps):
                mask = (idx[..., j] == e).unsqueeze(-1)
                out = out + torch.where(mask, w[..., j : j + 1] * mlp(x), torch.zeros_like(x))
        return out


def reference_moe(expert_dirs, gates, k):
    models = [LlamaForCausalLM.from_pretrained(d) for d in expert_dirs]
    ref = copy.deepcopy(models[0])
    sd = ref.state_dict()
    with torch.no_grad():
        for n, t in sd.items():
            if ".mlp." not in n:
                t.copy_(sum(m.state_dict()[n] for m in models) / len(models))
    routed = []
    for layer, block in enumerate(ref.model.layers):
        block.mlp = ReferenceRoutedMLP(gates[layer], [m.model.layers[layer].mlp for m in models], k)
        routed.append(block.mlp)
    return ref.eval(), routed


# --------------------------------------------------------------------------- MoErging


@pytest.mark.parametrize("k", [1, 2])
def test_moe_of_one_expert_repeated_gives_that_expert(experts, tokens, tmp_path, k):
    out = moerge_experts([experts[1]] * D, tmp_path / "moe", gates=random_gates(k), num_experts_per_tok=k)
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(moe, MixtralForCausalLM)
    expert = AutoModelForCausalLM.from_pretrained(experts[1])
    torch.testing.assert_close(logits(moe, tokens), logits(expert, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_moe_matches_handwritten_routing(experts, tokens, tmp_path, k):
    gates = random_gates(10 + k, scale=2.0)
    out = moerge_experts(experts, tmp_path / "moe", gates=gates, num_experts_per_tok=k)
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert moe.config.num_experts_per_tok == k
    ref, routed = reference_moe(experts, gates, k)
    torch.testing.assert_close(logits(moe, tokens), logits(ref, tokens), atol=1e-5, rtol=1e-5)
    # the comparison means something only if routing really mixes experts
    assert all(len(r.chosen) >= 2 for r in routed)
    # and the expert order matters: permuting the experts changes the output
    perm = moerge_experts(experts[::-1], tmp_path / "perm", gates=gates, num_experts_per_tok=k)
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(perm), tokens), logits(ref, tokens), atol=1e-4)


def test_oracle_equals_moe_forced_to_one_expert(experts, tokens, tmp_path):
    out = moerge_experts(experts, tmp_path / "moe", gates=random_gates(3))
    moe = load_moe(out)
    shared = shared_state_dict(experts)
    for d in range(D):

        def forced(hidden_states, d=d, gate=None):
            n = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
            return (
                torch.zeros(n, D),
                torch.ones(n, 1),
                torch.full((n, 1), d, dtype=torch.long),
            )

        for block in moe.model.layers:
            block.mlp.gate.forward = forced
        oracle = build_oracle_model(experts, d, shared=shared)
        assert isinstance(oracle, LlamaForCausalLM)
        torch.testing.assert_close(logits(oracle, tokens), logits(moe, tokens), atol=1e-5, rtol=1e-5)
        written = LlamaForCausalLM.from_pretrained(write_oracle(experts, d, tmp_path / f"oracle{d}"))
        assert torch.equal(logits(written, tokens), logits(oracle, tokens))
    # the oracles differ from each other (the forcing above is not vacuous)
    assert not torch.allclose(logits(build_oracle_model(experts, 0), tokens), logits(build_oracle_model(experts, 1), tokens))


def test_oracle_state_dict_is_average_plus_one_mlp(experts):
    sds = [load_file(d / "model.safetensors") for d in experts]
    sd = oracle_state_dict(experts, 2)
    assert set(sd) == set(sds[0])
    for n, t in sd.items():
        want = sds[2][n] if ".mlp." in n else sum(s[n] for s in sds) / D
        assert torch.equal(t, want), n


def test_fingerprint_identifies_shared_parameters(experts, tmp_path):
    moe = moerge_experts(experts, tmp_path / "moe", gates=random_gates(4))
    o1 = write_oracle(experts, 1, tmp_path / "o1")
    fp = shared_weights_fingerprint(moe)
    assert fp == shared_weights_fingerprint(o1) == shared_weights_fingerprint(build_oracle_model(experts, 0))
    assert fp == shared_weights_fingerprint(load_moe(moe))  # in memory: fused expert names, tied/untied lm_head
    assert fp == shared_weights_fingerprint(average_experts(experts, tmp_path / "avg"))  # MLPs excluded
    assert fp != shared_weights_fingerprint(experts[0])
    set_gates(moe, random_gates(5))
    assert shared_weights_fingerprint(moe) == fp  # routers are not shared parameters
    assert len(fp) == 16


def test_moe_files_use_save_pretrained_names_and_config(experts, tmp_path):
    gates = random_gates(5)
    extra = {"dume": {"domains": ["code", "math", "physics"], "lambda": 0.01}}
    out = moerge_experts(experts, tmp_path / "moe", gates=gates, num_experts_per_tok=2, extra_config=extra)
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    # exactly the names save_pretrained writes for the same config
    cfg = moe_config(LlamaConfig.from_pretrained(experts[0]), D, 2)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "ref")
    with safe_open(tmp_path / "ref" / "model.safetensors", "pt") as f:
        assert keys == set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in keys
    # the experts' tensors are where the legacy names say
    e2 = load_file(experts[2] / "model.safetensors")
    moe_sd = load_file(out / "model.safetensors")
    for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        assert torch.equal(moe_sd[f"model.layers.1.block_sparse_moe.experts.2.{w}.weight"], e2[f"model.layers.1.mlp.{proj}.weight"])
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "mixtral" and raw["num_local_experts"] == D and raw["num_experts_per_tok"] == 2
    assert raw["router_aux_loss_coef"] == 0.0 and raw["sliding_window"] is None and raw["output_router_logits"] is False
    llama = json.loads((experts[0] / "config.json").read_text())
    assert raw["rope_parameters"] == llama["rope_parameters"]  # not Mixtral's 1e6 theta
    assert raw["rms_norm_eps"] == llama["rms_norm_eps"] and raw["head_dim"] == llama["head_dim"]
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert moe.config.dume == extra["dume"]
    assert moe.config.num_experts_per_tok == 2
    for layer, g in enumerate(gates):
        assert torch.equal(moe.model.layers[layer].mlp.gate.weight, g)
        assert torch.equal(read_gates(out)[layer], g)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert check_experts(experts).tokenizer_fingerprint is not None


def test_moe_without_gates_writes_zero_routers(experts, tmp_path):
    with pytest.raises(DumeError, match="extra_config"):
        moerge_experts(experts, tmp_path / "moe", extra_config={"hidden_size": 64})
    assert not (tmp_path / "moe").exists()
    out = moerge_experts(experts, tmp_path / "moe", extra_config={"router_aux_loss_coef": 0.01})
    assert json.loads((out / "config.json").read_text())["router_aux_loss_coef"] == 0.01
    assert all(torch.equal(g, torch.zeros(D, 32)) for g in read_gates(out))
    assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 1


def test_many_experts_keep_their_order(tmp_path, tokens):
    """11 experts: expert 10 must not be sorted before expert 2 when loading."""
    n = 11
    dirs = make_experts(tmp_path, n=n, tokenizer=False, hidden_size=16, intermediate_size=16, num_hidden_layers=1)
    out = moerge_experts(dirs, tmp_path / "moe", gates=random_gates(0, d=n, h=16, layers=1))
    moe = AutoModelForCausalLM.from_pretrained(out)
    for e, d in enumerate(dirs):
        sd = load_file(d / "model.safetensors")
        gate_up = moe.model.layers[0].mlp.experts.gate_up_proj[e]
        want = torch.cat([sd["model.layers.0.mlp.gate_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"]], 0)
        assert torch.equal(gate_up, want), e


def test_sharded_input_and_output(experts, tokens, tmp_path):
    sharded = tmp_path / "sharded0"
    LlamaForCausalLM.from_pretrained(experts[0]).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    make_tokenizer(sharded)
    gates = random_gates(6)
    a = moerge_experts([sharded, *experts[1:]], tmp_path / "a", gates=gates)
    b = moerge_experts(experts, tmp_path / "b", gates=gates, max_shard_size=30_000)
    assert (b / "model.safetensors.index.json").is_file() and not (b / "model.safetensors").exists()
    la = logits(AutoModelForCausalLM.from_pretrained(a), tokens)
    lb = logits(AutoModelForCausalLM.from_pretrained(b), tokens)
    assert torch.equal(la, lb)
    assert [torch.equal(x, y) for x, y in zip(read_gates(b), gates)] == [True, True]


def test_tied_embeddings(tmp_path, tokens):
    dirs = make_experts(tmp_path, tokenizer=False, tie_word_embeddings=True)
    out = moerge_experts([dirs[0]] * 2, tmp_path / "moe", gates=random_gates(d=2))
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert moe.config.tie_word_embeddings
    torch.testing.assert_close(logits(moe, tokens), logits(LlamaForCausalLM.from_pretrained(dirs[0]), tokens), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- averaging


def test_average_equals_in_memory_average(experts, tokens, tmp_path):
    out = average_experts(experts, tmp_path / "avg", extra_config={"dume": {"strategy": "model_averaging"}})
    avg = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(avg, LlamaForCausalLM) and avg.config.dume == {"strategy": "model_averaging"}
    models = [LlamaForCausalLM.from_pretrained(d) for d in experts]
    ref = copy.deepcopy(models[0])
    with torch.no_grad():
        for n, t in ref.state_dict().items():
            t.copy_(sum(m.state_dict()[n] for m in models) / D)
    for n, t in avg.state_dict().items():
        assert torch.equal(t, ref.state_dict()[n]), n
    assert torch.equal(logits(avg, tokens), logits(ref, tokens))
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert sha(out / "tokenizer.json") == sha(experts[0] / "tokenizer.json")


def test_weighted_average(experts, tmp_path):
    out = average_experts(experts, tmp_path / "avg", weights=[2, 1, 1])
    sds = [load_file(d / "model.safetensors") for d in experts]
    got = load_file(out / "model.safetensors")
    for n, t in got.items():
        torch.testing.assert_close(t, 0.5 * sds[0][n] + 0.25 * sds[1][n] + 0.25 * sds[2][n])
    with pytest.raises(DumeError, match="weights"):
        average_experts(experts, tmp_path / "bad", weights=[1, 1])
    assert not (tmp_path / "bad").exists()


def test_bf16_experts_stay_bf16(tmp_path, tokens):
    dirs = make_experts(tmp_path, n=2, tokenizer=False)
    for d in dirs:
        LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16).save_pretrained(d)
    out = moerge_experts(dirs, tmp_path / "moe", gates=random_gates(d=2))
    with CheckpointReader(out) as rd:
        assert {rd.dtype(n) for n in rd.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------- bad input


def _variant(tmp_path: Path, name: str, **overrides) -> Path:
    """An expert with a different architecture (tokenizer included)."""
    d = make_experts(tmp_path / name, n=1, **overrides)[0]
    return d


@pytest.mark.parametrize(
    "field, overrides",
    [("hidden_size", dict(hidden_size=48)), ("num_hidden_layers", dict(num_hidden_layers=3)), ("vocab_size", dict(vocab_size=101))],
)
def test_mismatched_architecture_refused_before_writing(experts, tmp_path, field, overrides):
    bad = _variant(tmp_path, "bad", **overrides)
    for fn in (lambda o: moerge_experts([*experts, bad], o), lambda o: average_experts([experts[0], bad], o)):
        with pytest.raises(DumeError, match=field) as exc:
            fn(tmp_path / "out")
        assert "expert" in str(exc.value)
        assert not (tmp_path / "out").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(DumeError, match=field):
        moerge_experts([*experts, bad], existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_config_only_mismatch_refused(experts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(experts[1], bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["rope_parameters"]["rope_theta"] = 500000.0
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(DumeError, match=r"expert 1 .* rope_parameters"):
        moerge_experts([experts[0], bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensor_header_mismatch_refused(experts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(experts[1], bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.0.mlp.gate_proj.weight"] = sd["model.layers.0.mlp.gate_proj.weight"][:, :16].contiguous()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DumeError, match=r"shape of tensor model\.layers\.0\.mlp\.gate_proj\.weight"):
        average_experts([experts[0], bad], tmp_path / "out")
    sd = load_file(experts[1] / "model.safetensors")
    sd["model.extra.weight"] = torch.zeros(2)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DumeError, match="tensor names"):
        average_experts([experts[0], bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_mismatch_refused_and_missing_tokenizer_noted(experts, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(experts[1], bad)
    make_tokenizer(bad, reverse=True)
    with pytest.raises(DumeError, match="tokenizer"):
        moerge_experts([experts[0], bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    none = tmp_path / "none"
    shutil.copytree(experts[1], none)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (none / f).unlink()
    es = check_experts([experts[0], none])
    assert any("no tokenizer files" in n for n in es.notes)
    # tokenizer files come from the expert that has them
    out = average_experts([none, experts[0]], tmp_path / "avg")
    assert sha(out / "tokenizer.json") == sha(experts[0] / "tokenizer.json")


def test_missing_incomplete_corrupted_and_single_expert(experts, tmp_path):
    with pytest.raises(DumeError, match="does not exist"):
        moerge_experts([experts[0], tmp_path / "nope"], tmp_path / "out")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(experts[1], incomplete)
    (incomplete / "model.safetensors").unlink()
    with pytest.raises(DumeError, match="not a complete checkpoint"):
        moerge_experts([experts[0], incomplete], tmp_path / "out")
    corrupted = tmp_path / "corrupted"
    shutil.copytree(experts[1], corrupted)
    data = (corrupted / "model.safetensors").read_bytes()
    (corrupted / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(DumeError, match=r"corrupted.*corrupted/model\.safetensors"):
        moerge_experts([experts[0], corrupted], tmp_path / "out")
    with pytest.raises(DumeError, match="corrupted"):
        shared_weights_fingerprint(corrupted)
    with pytest.raises(DumeError, match="at least 2"):
        moerge_experts([experts[0]], tmp_path / "out")
    notllama = tmp_path / "notllama"
    shutil.copytree(experts[1], notllama)
    raw = json.loads((notllama / "config.json").read_text())
    raw["model_type"] = "gpt2"
    (notllama / "config.json").write_text(json.dumps(raw))
    with pytest.raises(DumeError, match="model_type"):
        average_experts([experts[0], notllama], tmp_path / "out")
    with pytest.raises(DumeError, match="is the input"):
        average_experts(experts, experts[0])
    with pytest.raises(DumeError, match="contains the input"):
        average_experts(experts, experts[0].parent)
    assert not (tmp_path / "out").exists()
    assert (experts[0] / "model.safetensors").is_file()


def test_biased_llama_cannot_be_moerged(tmp_path):
    dirs = make_experts(tmp_path, n=2, tokenizer=False, attention_bias=True)
    with pytest.raises(DumeError, match="attention_bias"):
        moerge_experts(dirs, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()
    average_experts(dirs, tmp_path / "avg")  # averaging has no such limit


# ------------------------------------------------------------------------------ set_gates


def test_set_gates_in_place_and_to_new_dir(experts, tokens, tmp_path):
    moe = moerge_experts(experts, tmp_path / "moe", gates=random_gates(1))
    new = random_gates(2, scale=3.0)
    copy_dir = set_gates(moe, new, out_dir=tmp_path / "copy", num_experts_per_tok=2)
    assert all(torch.equal(a, b) for a, b in zip(read_gates(moe), random_gates(1)))  # source untouched
    assert json.loads((moe / "config.json").read_text())["num_experts_per_tok"] == 1
    assert all(torch.equal(a, b) for a, b in zip(read_gates(copy_dir), new))
    set_gates(moe, new, num_experts_per_tok=2)
    assert json.loads((moe / "config.json").read_text())["num_experts_per_tok"] == 2
    direct = moerge_experts(experts, tmp_path / "direct", gates=new, num_experts_per_tok=2)
    want = logits(AutoModelForCausalLM.from_pretrained(direct), tokens)
    for d in (moe, copy_dir):
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(d), tokens), want)
    assert [p.name for p in moe.iterdir() if p.name.startswith(".")] == []


def test_set_gates_refuses_bad_shapes_without_touching_files(experts, tmp_path):
    moe = moerge_experts(experts, tmp_path / "moe", gates=random_gates(1))
    before = {p.name: sha(p) for p in moe.iterdir()}
    bad_calls = [
        (random_gates(d=D + 1), "shape"),
        (random_gates(h=31), "shape"),
        (random_gates(layers=1), "1 gates for 2 layers"),
        ([torch.full((D, 32), float("nan"))] * 2, "non-finite"),
    ]
    for gates, msg in bad_calls:
        with pytest.raises(DumeError, match=msg):
            set_gates(moe, gates)
    with pytest.raises(DumeError, match="num_experts_per_tok"):
        set_gates(moe, random_gates(2), num_experts_per_tok=D + 1)
    with pytest.raises(DumeError, match="shape"):
        set_gates(moe, random_gates(d=2), out_dir=tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    assert {p.name: sha(p) for p in moe.iterdir()} == before
    with pytest.raises(DumeError, match="model_type"):
        set_gates(experts[0], random_gates(2))
    with pytest.raises(DumeError, match="gates for 2 layers|shape"):
        moerge_experts(experts, tmp_path / "bad", gates=random_gates(layers=3))
    assert not (tmp_path / "bad").exists()


def test_reader_returns_private_copies(experts):
    """safe_open's tensors are views of a memory map: writing into one must not leak."""
    with CheckpointReader(experts[0]) as rd:
        t = rd.get("model.norm.weight")
        before = t.clone()
        t.add_(1.0)
        assert torch.equal(rd.get("model.norm.weight"), before)
        assert rd.shape("model.norm.weight") == (32,) and rd.dtype("model.norm.weight") == torch.float32


def test_reader_row_views_show_the_parts_of_a_fused_tensor(tmp_path):
    """The hook for fused projections (Phi-3's qkv_proj): the reader shows the parts in
    the stored tensor's place and reads just their rows; a view of a missing tensor, or
    parts that do not cover the stored rows, are refused."""
    from safetensors.torch import save_file

    from dume.checkpoint.experts import ExpertSet

    tmp_path.mkdir(exist_ok=True)
    fused = torch.arange(24.0).reshape(6, 4)
    save_file({"a": torch.ones(2), "qkv": fused, "z": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    views = {"q": ("qkv", 0, 2), "k": ("qkv", 2, 4), "v": ("qkv", 4, 6)}
    with CheckpointReader(tmp_path, views) as rd:
        assert rd.keys() == ["a", "q", "k", "v", "z"] and "qkv" not in rd
        for name, (_, a, b) in views.items():
            assert rd.shape(name) == (2, 4) and rd.dtype(name) == torch.float32
            assert torch.equal(rd.get(name), fused[a:b])
    with pytest.raises(DumeError, match="no tensor named nope to split"):
        CheckpointReader(tmp_path, {"x": ("nope", 0, 1)})
    es = ExpertSet(dirs=(tmp_path,), config=None, tokenizer_fingerprint=None, tokenizer_dir=None,
                   tensors={"qkv": ((6, 4), torch.float32)}, arch=type("Arch", (), {
                       "row_views": staticmethod(lambda names, cfg: {"q": ("qkv", 0, 2), "k": ("qkv", 2, 5)})})())
    with pytest.raises(DumeError, match="tensor qkv has 6 rows"):
        es.split_fused()
