"""Router weights and routing: our gates must behave exactly like Mixtral's router."""

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from dume.errors import DumeError
from dume.stats.ridge import RidgeStats
from dume.routers.closed_form import centroid_gates, dume_gates, gates_from_solution, random_gates, route

H, D, L = 16, 4, 2


def mixtral_router(gate, k):
    cfg = MixtralConfig(
        hidden_size=gate.shape[1], num_local_experts=gate.shape[0], num_experts_per_tok=k, intermediate_size=8
    )
    r = MixtralTopKRouter(cfg)
    with torch.no_grad():
        r.weight.copy_(gate)
    return r


def toy_stats(seed=0, n=400):
    """D domains whose features are N(mu_d, 3²) with well separated means."""
    g = torch.Generator().manual_seed(seed)
    st = RidgeStats(L, H, [f"d{j}" for j in range(D)])
    xs = {}
    for j, d in enumerate(st.domains):
        for layer in range(L):
            mu = torch.randn(H, generator=g) * 4
            x = mu + 3 * torch.randn(n, H, generator=g)
            st.update(layer, d, x)
            xs[(layer, j)] = x
    return st, xs


def hand_route(x, gate, k):
    """TopK(Softmax(gate @ x)), renormalised, one token at a time in plain Python."""
    ws, ids = [], []
    for row in x.double():
        logits = [float(g @ row) for g in gate.double()]
        m = max(logits)
        e = [torch.tensor(v - m).exp().item() for v in logits]
        p = [v / sum(e) for v in e]
        order = sorted(range(len(p)), key=lambda i: -p[i])[:k]
        tot = sum(p[i] for i in order)
        ws.append([p[i] / tot for i in order])
        ids.append(order)
    return torch.tensor(ws), torch.tensor(ids)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("kind", ["dume", "random"])
def test_route_matches_mixtral_router(k, kind):
    st, xs = toy_stats()
    gates = dume_gates(st, 0.01, temperature=0.5) if kind == "dume" else random_gates(L, D, H, seed=7, std=0.5)
    x = torch.cat([xs[(0, j)][:25] for j in range(D)])
    gate = gates[0]
    assert gate.shape == (D, H) and gate.dtype == torch.float32
    w, idx = route(x, gate, k)
    logits, scores, indices = mixtral_router(gate, k)(x)
    assert torch.equal(idx, indices)
    torch.testing.assert_close(w, scores)
    torch.testing.assert_close(w.sum(-1), torch.ones(len(x)))
    if k == 1:
        assert torch.equal(w, torch.ones(len(x), 1))
    hw, hidx = hand_route(x, gate, k)
    assert torch.equal(idx, hidx)
    torch.testing.assert_close(w, hw.float())


def test_gates_are_transposed_solution_over_temperature():
    st, _ = toy_stats()
    W = st.solve(0.01)
    for T in (1.0, 0.1):
        gates = gates_from_solution(W, T)
        assert len(gates) == L
        for layer in range(L):
            torch.testing.assert_close(gates[layer], (W[layer].T / T).float())
    assert [g.tolist() for g in dume_gates(st, 0.01, 0.1)] == [g.tolist() for g in gates_from_solution(W, 0.1)]


def test_temperature_scales_logits_and_sharpens():
    st, xs = toy_stats()
    x = xs[(1, 2)][:50]
    g1 = dume_gates(st, 0.01, temperature=1.0)[1]
    g01 = dume_gates(st, 0.01, temperature=0.1)[1]
    torch.testing.assert_close(x @ g01.T, 10 * (x @ g1.T), rtol=1e-5, atol=1e-5)
    w1, i1 = route(x, g1, 2)
    w01, i01 = route(x, g01, 2)
    # the same winner (runners-up may tie at probability 0 once T is small) ...
    assert torch.equal(i1[:, 0], i01[:, 0])
    assert (w01[:, 0] >= w1[:, 0] - 1e-6).all() and w01[:, 0].mean() > w1[:, 0].mean()  # ... sharper


def test_dume_routes_domains_to_their_experts():
    st, xs = toy_stats()
    gates = dume_gates(st, 0.01)
    for layer in range(L):
        for j in range(D):
            _, idx = route(xs[(layer, j)], gates[layer], 1)
            assert (idx[:, 0] == j).float().mean() > 0.9


def test_subset_and_relative_lambda_and_centroid():
    st, _ = toy_stats()
    sub = dume_gates(st, 0.01, domains=["d2", "d0"])
    assert sub[0].shape == (2, H)
    torch.testing.assert_close(sub[0], st.solve(0.01, domains=["d2", "d0"])[0].T.float())
    rel = dume_gates(st, 0.5, relative_lambda=True)
    torch.testing.assert_close(rel[1], st.solve(0.5, relative=True)[1].T.float())
    c = centroid_gates(st, temperature=0.5)
    torch.testing.assert_close(c[0], (st.centroid()[0].T / 0.5).float())
    torch.testing.assert_close(c[0].norm(dim=1), torch.full((D,), 2.0))


def test_random_gates_seeded():
    a = random_gates(3, D, H, seed=1)
    torch.manual_seed(123)  # the global RNG must not matter
    b = random_gates(3, D, H, seed=1)
    c = random_gates(3, D, H, seed=2)
    assert len(a) == 3 and all(g.shape == (D, H) and g.dtype == torch.float32 for g in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # layers differ
    big = torch.cat(random_gates(4, 64, 256, seed=0))
    assert abs(big.std().item() - 0.02) < 0.001 and abs(big.mean().item()) < 0.001


def test_errors():
    st, _ = toy_stats()
    gate = random_gates(1, D, H, seed=0)[0]
    x = torch.randn(3, H)
    for k in (0, D + 1):
        with pytest.raises(DumeError, match="top-k"):
            route(x, gate, k)
    with pytest.raises(DumeError, match=r"\[N, H\]"):
        route(torch.randn(3, H + 1), gate, 1)
    for T in (0, -1, float("nan")):
        with pytest.raises(DumeError, match="temperature"):
            dume_gates(st, 0.01, temperature=T)
        with pytest.raises(DumeError, match="temperature"):
            centroid_gates(st, temperature=T)
    with pytest.raises(DumeError, match=r"\[L, H, D\]"):
        gates_from_solution(torch.randn(H, D), 1.0)
    with pytest.raises(DumeError, match="lambda"):
        dume_gates(st, 0.0)
