"""RidgeStats: accumulation, algebra on domains, solve, centroid, persistence."""

import numpy as np
import pytest
import scipy.linalg
import torch

from dume.errors import DumeError
from dume.stats.ridge import RidgeStats

L, H = 3, 16
DOMAINS = ["code", "math", "physics"]


def make_data(seed=0, n_per_domain=(700, 500, 300), dtype=torch.float32):
    """Per layer and domain, features ~ N(mu_{l,d}, 3²) in [B, T, H] blocks with a mask.

    Returns {(layer, domain): list of (features [B,T,H], mask [B,T])}: the same token
    batches at every layer (as in a real forward pass) but different feature values.
    """
    g = torch.Generator().manual_seed(seed)
    data = {}
    for d, n in zip(DOMAINS, n_per_domain):
        batches = []
        left = n
        while left > 0:
            B, T = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(5, 40, (1,), generator=g))
            mask = torch.rand(B, T, generator=g) < 0.8
            batches.append((B, T, mask))
            left -= int(mask.sum())
        for layer in range(L):
            mu = torch.randn(H, generator=g) * 2
            data[(layer, d)] = [
                ((mu + 3 * torch.randn(B, T, H, generator=g)).to(dtype), mask) for B, T, mask in batches
            ]
    return data


def build(data, domains=DOMAINS, order_seed=None, **kw):
    st = RidgeStats(L, H, domains, **kw)
    items = [(k, i) for k in data for i in range(len(data[k])) if k[1] in domains]
    if order_seed is not None:
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(order_seed))
        items = [items[i] for i in perm]
    for (layer, d), i in items:
        x, m = data[(layer, d)][i]
        st.update(layer, d, x, m)
    return st


def reference(data, domains=DOMAINS):
    """Float64 NumPy sums over the masked tokens: A [L,D,H,H], s [L,D,H], n [L,D]."""
    A = np.zeros((L, len(domains), H, H))
    s = np.zeros((L, len(domains), H))
    n = np.zeros((L, len(domains)), dtype=np.int64)
    for j, d in enumerate(domains):
        for layer in range(L):
            X = np.concatenate([x.double().numpy()[m.numpy()] for x, m in data[(layer, d)]])
            A[layer, j], s[layer, j], n[layer, j] = X.T @ X, X.sum(0), len(X)
    return A, s, n


def ref_solve(A, s, lam):
    """scipy solve per layer of (Σ_d A_d + λI) W = [s_d], then unit-norm columns."""
    out = []
    for layer in range(A.shape[0]):
        W = scipy.linalg.solve(A[layer].sum(0) + lam * np.eye(H), s[layer].T, assume_a="pos")
        out.append(W / np.linalg.norm(W, axis=0, keepdims=True))
    return np.stack(out)


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def stats(data):
    return build(data, order_seed=1)


# ---------------------------------------------------------------- accumulation


def test_batched_random_order_equals_closed_form_and_scipy(data, stats):
    A, s, n = reference(data)
    np.testing.assert_array_equal(stats.n.numpy(), n)
    for layer in range(L):
        for j in range(len(DOMAINS)):
            assert rel(stats.A[layer, j], A[layer, j]) < 1e-6
            assert rel(stats.s[layer, j], s[layer, j]) < 1e-6
    for lam in (0.01, 10.0):
        W = stats.solve(lam)
        assert W.shape == (L, H, len(DOMAINS)) and W.dtype == torch.float64
        Wref = ref_solve(A, s, lam)
        for layer in range(L):
            assert rel(W[layer], Wref[layer]) < 1e-6
        torch.testing.assert_close(W.norm(dim=1), torch.ones(L, len(DOMAINS), dtype=torch.float64))


def test_one_shot_equals_batched(data, stats):
    one = RidgeStats(L, H, DOMAINS)
    for (layer, d), batches in data.items():
        X = torch.cat([x.reshape(-1, H)[m.reshape(-1)] for x, m in batches])
        one.update(layer, d, X)  # [N, H], no mask
    assert torch.equal(one.n, stats.n)
    assert rel(one.A, stats.A) < 1e-6
    assert rel(one.s, stats.s) < 1e-6
    assert rel(one.solve(0.01), stats.solve(0.01)) < 1e-6


def test_float32_accumulation_close_to_float64_reference_at_scale():
    """Many large batches: float32 per batch + float64 running sum stays at ~1e-6."""
    g = torch.Generator().manual_seed(3)
    st = RidgeStats(1, H, ["a", "b"])
    Xs = {"a": [], "b": []}
    for i in range(40):
        for d, mu in (("a", 1.0), ("b", -0.5)):
            x = mu + 3 * torch.randn(2, 512, H, generator=g)
            st.update(0, d, x)
            Xs[d].append(x.reshape(-1, H).double().numpy())
    A = np.stack([np.concatenate(Xs[d]).T @ np.concatenate(Xs[d]) for d in "ab"])[None]
    s = np.stack([np.concatenate(Xs[d]).sum(0) for d in "ab"])[None]
    assert rel(st.A, A) < 1e-6
    assert rel(st.solve(0.01), ref_solve(A, s, 0.01)) < 1e-6


def test_bf16_input(data):
    bf = {k: [(x.bfloat16(), m) for x, m in v] for k, v in data.items()}
    st = build(bf)
    assert st.A.dtype == torch.float64
    A, s, _ = reference({k: [(x.float(), m) for x, m in v] for k, v in bf.items()})
    assert rel(st.A, A) < 1e-6
    assert rel(st.solve(0.01), ref_solve(A, s, 0.01)) < 1e-6
    # unmasked, large bf16 batches: summing in bf16 would be off by ~1e-3
    x = (1 + 3 * torch.randn(4, 512, H)).bfloat16()
    one = RidgeStats(1, H, ["a"])
    one.update(0, "a", x)
    X = x.reshape(-1, H).double().numpy()
    assert rel(one.A[0, 0], X.T @ X) < 1e-6
    assert rel(one.s[0, 0], X.sum(0)) < 1e-6


def test_mask_accepts_0_1_ints_and_all_layers_helper():
    x = torch.randn(2, 5, H)
    m = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    a = RidgeStats(2, H, ["d"])
    a.update_all_layers("d", [x, 2 * x], m)
    b = RidgeStats(2, H, ["d"])
    sel = x[m.bool()]
    b.update(0, "d", sel)
    b.update(1, "d", 2 * sel)
    assert a.token_counts() == {"d": [3, 3]}
    # float32 sums over differently shaped batches round differently in the last bits
    torch.testing.assert_close(a.A, b.A, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.s, b.s, rtol=1e-6, atol=1e-6)


def test_update_validation():
    st = RidgeStats(2, H, ["d"])
    with pytest.raises(DumeError, match="layer 2"):
        st.update(2, "d", torch.randn(4, H))
    with pytest.raises(DumeError, match="unknown domain 'x'"):
        st.update(0, "x", torch.randn(4, H))
    with pytest.raises(DumeError, match="H = 16"):
        st.update(0, "d", torch.randn(4, H + 1))
    with pytest.raises(DumeError, match="mask shape"):
        st.update(0, "d", torch.randn(2, 3, H), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(DumeError, match="floating point"):
        st.update(0, "d", torch.ones(4, H, dtype=torch.long))
    with pytest.raises(DumeError, match="non-finite"):
        st.update(0, "d", torch.full((4, H), float("nan")))
    with pytest.raises(DumeError, match="layers"):
        st.update_all_layers("d", [torch.randn(4, H)])
    assert st.token_counts() == {"d": [0, 0]}


def test_constructor_validation():
    with pytest.raises(DumeError, match="duplicate"):
        RidgeStats(1, H, ["a", "a"])
    with pytest.raises(DumeError, match="at least one domain"):
        RidgeStats(1, H, [])
    with pytest.raises(DumeError, match="core metadata"):
        RidgeStats(1, H, ["a"], extra_meta={"hidden_size": 3})


# ---------------------------------------------------------------- algebra on domains


def test_merge_disjoint_halves_equals_all(data, stats):
    first = {k: v[: len(v) // 2] for k, v in data.items()}
    second = {k: v[len(v) // 2 :] for k, v in data.items()}
    a = build(first, model_fingerprint="fp", data_source="part1")
    b = build(second, model_fingerprint="fp", data_source="part2")
    m = a + b
    assert m.domains == DOMAINS and m.model_fingerprint == "fp"
    assert torch.equal(m.n, stats.n)
    torch.testing.assert_close(m.A, stats.A, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(m.s, stats.s, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(m.solve(0.01), stats.solve(0.01), rtol=1e-9, atol=1e-12)
    # the inputs are left untouched
    assert torch.equal(a.n + b.n, stats.n)


def test_merge_domain_union_order(data, stats):
    a = build(data, domains=["math", "code"])
    b = build(data, domains=["physics", "code"])
    m = a.merge(b)
    assert m.domains == ["math", "code", "physics"]
    torch.testing.assert_close(m.A[:, 0], stats.A[:, 1])
    torch.testing.assert_close(m.A[:, 1], 2 * stats.A[:, 0])
    torch.testing.assert_close(m.s[:, 2], stats.s[:, 2])
    assert m.token_counts()["code"] == [2 * c for c in stats.token_counts()["code"]]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(model_fingerprint="other"), "model_fingerprint"),
        (dict(hidden=H + 1), "hidden_size"),
        (dict(layers=L + 1), "num_layers"),
        (dict(num_dume_tokens=64), "num_dume_tokens"),
    ],
)
def test_merge_refuses_mismatch(kw, match):
    a = RidgeStats(L, H, ["a"], model_fingerprint="fp", num_dume_tokens=32)
    b = RidgeStats(
        kw.get("layers", L),
        kw.get("hidden", H),
        ["a"],
        model_fingerprint=kw.get("model_fingerprint", "fp"),
        num_dume_tokens=kw.get("num_dume_tokens", 32),
    )
    with pytest.raises(DumeError, match=match):
        a + b


def test_merge_allows_unknown_fingerprint():
    a = RidgeStats(1, H, ["a"], model_fingerprint="fp")
    b = RidgeStats(1, H, ["b"])
    assert (b + a).model_fingerprint == "fp"


def test_remove_domain_equals_stats_built_without_it(data, stats):
    without = build(data, domains=["code", "physics"])
    r = stats.remove_domain("math")
    assert r.domains == ["code", "physics"] and stats.domains == DOMAINS
    torch.testing.assert_close(r.solve(0.01), without.solve(0.01), rtol=1e-12, atol=1e-12)
    A, s, _ = reference(data, ["code", "physics"])
    assert rel(r.solve(0.01), ref_solve(A, s, 0.01)) < 1e-6
    with pytest.raises(DumeError, match="only domain"):
        r.remove_domain("code").remove_domain("physics")
    with pytest.raises(DumeError, match="unknown domain"):
        stats.remove_domain("biology")


def test_scale_domain(data, stats):
    sc = stats.scale_domain("math", 2.5)
    torch.testing.assert_close(sc.A[:, 1], 2.5 * stats.A[:, 1])
    torch.testing.assert_close(sc.s[:, 1], 2.5 * stats.s[:, 1])
    torch.testing.assert_close(sc.A[:, 0], stats.A[:, 0])
    assert torch.equal(sc.n, stats.n)
    A, s, _ = reference(data)
    A[:, 1] *= 2.5
    s[:, 1] *= 2.5
    assert rel(sc.solve(0.01), ref_solve(A, s, 0.01)) < 1e-6
    assert rel(sc.solve(0.01), stats.solve(0.01)) > 1e-4  # it does change the router
    # doubling a domain equals feeding its data twice
    twice = build({**data, **{k: v + v for k, v in data.items() if k[1] == "physics"}})
    torch.testing.assert_close(stats.scale_domain("physics", 2).solve(0.01), twice.solve(0.01))
    for w in (0, -1, float("inf")):
        with pytest.raises(DumeError, match="weight"):
            stats.scale_domain("math", w)


def test_select_and_solve_subset(data, stats):
    sub = stats.select(["physics", "code"])
    assert sub.domains == ["physics", "code"]
    A, s, _ = reference(data, ["physics", "code"])
    ref = ref_solve(A, s, 0.01)
    assert rel(sub.solve(0.01), ref) < 1e-6
    assert rel(stats.solve(0.01, domains=["physics", "code"]), ref) < 1e-6
    with pytest.raises(DumeError, match="duplicate"):
        stats.select(["code", "code"])
    with pytest.raises(DumeError, match="unknown domain 'bio'"):
        stats.select(["bio"])


# ---------------------------------------------------------------- solve errors and variants


def test_solve_errors(stats):
    for lam in (0, -1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(DumeError, match="lambda"):
            stats.solve(lam)
    with pytest.raises(DumeError, match="unknown domain 'bio'"):
        stats.solve(0.01, domains=["code", "bio"])
    empty = stats.merge(RidgeStats(L, H, ["history"]))
    with pytest.raises(DumeError, match="'history' has no tokens"):
        empty.solve(0.01)
    with pytest.raises(DumeError, match="'history' has no tokens"):
        empty.centroid()
    empty.solve(0.01, domains=DOMAINS)  # leaving it out is fine


def test_zero_column_error():
    st = RidgeStats(1, H, ["a", "zero"])
    st.update(0, "a", torch.randn(50, H) + 1)
    st.update(0, "zero", torch.zeros(10, H))
    with pytest.raises(DumeError, match="'zero'.*zero"):
        st.solve(0.01)


def test_not_positive_definite_error(stats):
    bad = stats.select(DOMAINS)
    bad.A[1] = -bad.A[1]
    with pytest.raises(DumeError, match=r"not positive definite at layer\(s\) \[1\].*larger lambda"):
        bad.solve(0.01)


def test_relative_lambda(stats):
    lam = 0.05
    W = stats.solve(lam, relative=True)
    A = stats.A.sum(1)
    for layer in range(L):
        lam_abs = lam * A[layer].trace().item() / H
        torch.testing.assert_close(W[layer], stats.solve(lam_abs)[layer], rtol=1e-10, atol=1e-12)
    # and it is not the same as the absolute one
    assert rel(W, stats.solve(lam)) > 1e-3


def test_centroid_and_large_lambda_limit(data, stats):
    C = stats.centroid()
    _, s, n = reference(data)
    mean = s / n[..., None]
    ref = np.transpose(mean / np.linalg.norm(mean, axis=-1, keepdims=True), (0, 2, 1))
    assert rel(C, ref) < 1e-6
    W = stats.solve(1e12)
    cos = (W * C).sum(dim=1)
    assert cos.min() > 1 - 1e-6
    # at a small lambda the whitening by A⁻¹ makes DUME differ from the centroid
    assert (stats.solve(0.01) * C).sum(dim=1).min() < 0.999


def test_dume_separates_domains(data, stats):
    """Sanity of orientation: domain d's tokens score highest on column d most of the time."""
    W = stats.solve(0.01)
    for layer in range(L):
        for j, d in enumerate(DOMAINS):
            X = torch.cat([x[m] for x, m in data[(layer, d)]]).double()
            acc = ((X @ W[layer]).argmax(1) == j).double().mean()
            assert acc > 0.6, (layer, d, acc)


# ---------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path, stats):
    st = stats.merge(RidgeStats(L, H, ["x"]))
    st.model_fingerprint = "abc123"
    st.num_dume_tokens = 128
    st.data_source = "test split"
    st.extra_meta = {"collected_by": "pytest", "nested": {"a": [1, 2]}}
    st.save(tmp_path / "stats")
    st.save(tmp_path / "stats")  # overwriting is fine
    back = RidgeStats.load(tmp_path / "stats")
    assert back.meta == st.meta
    for k in ("A", "s", "n"):
        assert torch.equal(getattr(back, k), getattr(st, k))
    assert torch.equal(back.solve(0.01, domains=DOMAINS), st.solve(0.01, domains=DOMAINS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats"]


def test_load_errors(tmp_path, stats):
    with pytest.raises(DumeError, match="no ridge statistics"):
        RidgeStats.load(tmp_path / "nope")
    p = stats.save(tmp_path / "s")
    (p / "stats.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DumeError, match="corrupted"):
        RidgeStats.load(p)
    p = stats.save(tmp_path / "s")
    (p / "stats.json").write_text("{not json")
    with pytest.raises(DumeError, match="corrupted JSON"):
        RidgeStats.load(p)
    p = stats.save(tmp_path / "s")
    doc = (p / "stats.json").read_text().replace('"hidden_size": 16', '"hidden_size": 8')
    (p / "stats.json").write_text(doc)
    with pytest.raises(DumeError, match="hidden 8"):
        RidgeStats.load(p)
    p = stats.save(tmp_path / "s")
    (p / "stats.safetensors").unlink()
    with pytest.raises(DumeError, match="missing"):
        RidgeStats.load(p)


def test_save_refuses_unserialisable_meta(tmp_path):
    st = RidgeStats(1, H, ["a"], extra_meta={"bad": object()})
    with pytest.raises(DumeError, match="JSON"):
        st.save(tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_rank_deficient_statistics_solve_as_in_exact_arithmetic():
    """Features spanning fewer than H directions (two tokens per document: every first
    position is BOS) leave A with zero eigenvalues that float32 rounding can push just
    below 0, and a small λ then breaks the Cholesky factorisation. The solve must give
    the ridge solution of the PSD matrix that exact arithmetic would have built."""
    g = torch.Generator().manual_seed(0)
    V, _ = torch.linalg.qr(torch.randn(H, H, generator=g, dtype=torch.float64))
    e = torch.zeros(H, dtype=torch.float64)
    e[:5] = torch.tensor([1e5, 3e4, 2e3, 50.0, 1.0], dtype=torch.float64)
    e[5:9] = -1e-2  # rounding-sized (1e-7 of the largest), larger than λ
    s = RidgeStats(1, H, DOMAINS)
    s.A[0, 0] = V @ torch.diag(e) @ V.T
    s.s[0] = torch.randn(len(DOMAINS), H, generator=g, dtype=torch.float64) @ torch.diag(e.clamp(min=0).sqrt()) @ V.T
    s.n[0] = 10
    lam = 1e-3
    assert torch.linalg.cholesky_ex(s.A[0, 0] + lam * torch.eye(H, dtype=torch.float64))[1] != 0
    exact = V @ torch.diag(e.clamp(min=0)) @ V.T + lam * torch.eye(H, dtype=torch.float64)
    expected = torch.from_numpy(scipy.linalg.solve(exact.numpy(), s.s[0].T.numpy(), assume_a="pos"))
    expected = expected / expected.norm(dim=0, keepdim=True)
    torch.testing.assert_close(s.solve(lam)[0], expected, rtol=1e-6, atol=1e-8)  # cond(A + λI) ~ 1e8
    s.A[0, 0] -= 1e3 * torch.outer(V[:, 7], V[:, 7])  # a clearly negative direction: corrupted
    with pytest.raises(DumeError, match=r"not positive definite at layer\(s\) \[0\]"):
        s.solve(lam)
