"""Sufficient statistics of DUME's ridge-regression router, and its closed-form solve (docs/design.md §2).

With one-hot domain targets Y, column d of XᵀY is the sum of domain d's features, so the whole state is, per
layer l and domain d (paper, Eqs. 2, 6, 7):

    A[l, d] = Σ x xᵀ   (H×H)     s[l, d] = Σ x   (H)     n[l, d] = token count

Keeping A *per domain* (not only Σ_d A[l, d]) costs D times the memory but makes adding, removing or
re-weighting a domain exact (§5): sums, slices and scalings of these tensors. Nothing here depends on λ, so the
statistics are what is saved beside a model and what independent parties compute apart and sum.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from dume.checkpoint.io import atomic_dir, atomic_write_json, read_json
from dume.errors import DumeError

FORMAT_NAME = "dume-ridge-stats"
FORMAT_VERSION = 1
TENSORS_FILE = "stats.safetensors"
META_FILE = "stats.json"
_CORE_META = ("model_fingerprint", "hidden_size", "num_layers", "domains", "num_dume_tokens", "data_source")

STATS_SUBDIR = "dume_stats"  # the statistics beside a routed checkpoint (read by dume.upcycle.dynamic)


class RidgeStats:
    """Per-layer, per-domain ridge-regression statistics (see the module docstring).

    Tensors: ``A`` [L, D, H, H] float64, ``s`` [L, D, H] float64, ``n`` [L, D] int64, all on ``device``.
    Operations on the set or weight of domains (``merge``, ``+``, ``remove_domain``, ``scale_domain``,
    ``select``) return a new object; only ``update`` / ``update_all_layers`` accumulate in place.
    """

    def __init__(self, num_layers: int, hidden_size: int, domains: Sequence[str], *,
                 model_fingerprint: str | None = None, num_dume_tokens: int | None = None, data_source: str = "",
                 extra_meta: dict[str, Any] | None = None, device: str | torch.device = "cpu"):
        if int(num_layers) < 1 or int(hidden_size) < 1:
            raise DumeError(f"num_layers and hidden_size must be >= 1, got {num_layers} and {hidden_size}")
        domains = _check_domain_list(domains)
        if num_dume_tokens is not None and int(num_dume_tokens) < 1:
            raise DumeError(f"num_dume_tokens must be >= 1 or None (all tokens), got {num_dume_tokens}")
        extra_meta = dict(extra_meta or {})
        clash = sorted(set(extra_meta) & set(_CORE_META))
        if clash:
            raise DumeError(f"extra_meta may not redefine core metadata keys {clash}")
        self.num_layers = int(num_layers)
        self.hidden_size = int(hidden_size)
        self.domains: list[str] = domains
        self.model_fingerprint = model_fingerprint
        self.num_dume_tokens = None if num_dume_tokens is None else int(num_dume_tokens)
        self.data_source = str(data_source)
        self.extra_meta = extra_meta
        self.device = torch.device(device)
        L, D, H = self.num_layers, len(domains), self.hidden_size
        self.A = torch.zeros(L, D, H, H, dtype=torch.float64, device=self.device)
        self.s = torch.zeros(L, D, H, dtype=torch.float64, device=self.device)
        self.n = torch.zeros(L, D, dtype=torch.int64, device=self.device)
        # Per-token targets (dume.stats.loss_aware): [L, D, D, H], row j = domain j's tokens, column e = their YᵀX
        # for expert e; s = targets.sum(1). Kept per domain: re-weighting one re-weights its share of each column.
        self.targets: torch.Tensor | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """Everything that describes the statistics (JSON-serialisable if extra_meta is)."""
        return {**{k: getattr(self, k) for k in _CORE_META}, "domains": list(self.domains), **self.extra_meta}

    def token_counts(self) -> dict[str, list[int]]:
        """Domain -> tokens counted at each layer (equal across layers in normal use)."""
        n = self.n.cpu()
        return {d: [int(v) for v in n[:, j]] for j, d in enumerate(self.domains)}

    def __repr__(self) -> str:
        counts = {d: c[0] for d, c in self.token_counts().items()}
        return (f"RidgeStats(num_layers={self.num_layers}, hidden_size={self.hidden_size}, tokens={counts}, "
                f"num_dume_tokens={self.num_dume_tokens}, model_fingerprint={self.model_fingerprint!r})")

    def _index(self, domain: str) -> int:
        try:
            return self.domains.index(domain)
        except ValueError:
            raise DumeError(f"unknown domain {domain!r}; the statistics hold {self.domains}") from None

    def _indices(self, domains: Iterable[str] | None) -> list[int]:
        if domains is None:
            return list(range(len(self.domains)))
        if isinstance(domains, str):
            domains = [domains]
        names = _check_domain_list(domains)
        return [self._index(d) for d in names]

    def _like(self, domains: list[str]) -> RidgeStats:
        """An empty RidgeStats with this one's metadata and the given domains."""
        return RidgeStats(self.num_layers, self.hidden_size, domains, model_fingerprint=self.model_fingerprint,
                          num_dume_tokens=self.num_dume_tokens, data_source=self.data_source,
                          extra_meta=dict(self.extra_meta), device=self.device)

    @torch.no_grad()
    def update(self, layer: int, domain: str, features: torch.Tensor, mask: torch.Tensor | None = None,
               targets: torch.Tensor | None = None) -> None:
        """Add one batch of router inputs of `domain` at `layer`.

        features: [B, T, H] or [N, H], any float dtype and device. mask: same leading shape, bool or 0/1; tokens
        where it is false/0 (padding, tokens past num_dume_tokens) do not count. The batch's XᵀX and Σx are
        computed in float32 on the features' device -- bf16 sums lose too much, float64 matmuls are slow on GPUs
        -- then added into the float64 totals, so rounding does not grow with the number of batches.

        targets: per-token targets [..., D] over the experts (in `domains` order) when not the one-hot of
        `domain` (`dume.stats.loss_aware`): `s[layer]` then gains YᵀX instead of Σx in the domain's row, and
        `self.targets` keeps the domain's own part of it. A stays per domain.
        """
        if not 0 <= layer < self.num_layers:
            raise DumeError(f"layer {layer} out of range: the statistics have {self.num_layers} layers")
        j = self._index(domain)
        if not torch.is_floating_point(features):
            raise DumeError(f"features must be floating point (router inputs), got dtype {features.dtype}")
        if features.dim() not in (2, 3) or features.shape[-1] != self.hidden_size:
            raise DumeError(f"features must be [B, T, H] or [N, H] with H = {self.hidden_size}, "
                            f"got shape {tuple(features.shape)}")
        x = features.reshape(-1, self.hidden_size).to(torch.float32)
        if mask is not None:
            if tuple(mask.shape) != tuple(features.shape[:-1]):
                raise DumeError(f"mask shape {tuple(mask.shape)} does not match features' leading shape "
                                f"{tuple(features.shape[:-1])}")
            # `where`, not boolean indexing (a device sync) nor a product with the mask (inf at padding -> NaN).
            m = mask.reshape(-1).to(device=x.device).bool()
            x = torch.where(m.unsqueeze(1), x, 0.0)
            count = m.sum()
        else:
            count = torch.tensor(x.shape[0])
        xtx = x.T @ x
        sx = x.sum(dim=0)
        # A NaN/inf feature always reaches Σx, so one check on the H-vector suffices.
        if not bool(torch.isfinite(sx).all()):
            raise DumeError(f"non-finite router inputs at layer {layer} for domain {domain!r} (NaN/inf in features)")
        self.A[layer, j] += xtx.to(device=self.device, dtype=torch.float64)
        if targets is None:
            if self.targets is not None:
                raise DumeError("these statistics hold per-token targets: every update must give them")
            self.s[layer, j] += sx.to(device=self.device, dtype=torch.float64)
        else:
            D = len(self.domains)
            if tuple(targets.shape) != (*features.shape[:-1], D):
                raise DumeError(f"targets must be {[*features.shape[:-1], D]}, got {list(targets.shape)}")
            y = targets.reshape(-1, D).to(device=x.device, dtype=torch.float32)
            if mask is not None:
                y = torch.where(m.unsqueeze(1), y, 0.0)
            if not bool(torch.isfinite(y).all()):
                raise DumeError(f"non-finite targets at layer {layer} for domain {domain!r}")
            ytx = (y.T @ x).to(device=self.device, dtype=torch.float64)
            if self.targets is None:
                if bool(self.n.any()):
                    raise DumeError("targets must be given from the first update on (these statistics have "
                                    "one-hot updates already)")
                self.targets = torch.zeros(self.num_layers, D, D, self.hidden_size, dtype=torch.float64,
                                           device=self.device)
            self.targets[layer, j] += ytx
            self.s[layer] += ytx
        self.n[layer, j] += count.to(device=self.device, dtype=torch.int64)

    def update_all_layers(self, domain: str, features_per_layer: Sequence[torch.Tensor],
                          mask: torch.Tensor | None = None) -> None:
        """`update` every layer from one forward pass: features_per_layer[l] is layer l's input."""
        if len(features_per_layer) != self.num_layers:
            raise DumeError(f"got features for {len(features_per_layer)} layers, the statistics have {self.num_layers}")
        for layer, feats in enumerate(features_per_layer):
            self.update(layer, domain, feats, mask)

    def merge(self, other: RidgeStats) -> RidgeStats:
        """Sum two statistics: the union of their domains (self's order, then other's new ones); a domain in both
        gets the sum of its terms. Sums only mean something for features of one model under one token rule, so
        differing fingerprints (when both are known), shapes or num_dume_tokens are refused, not mixed."""
        if not isinstance(other, RidgeStats):
            raise DumeError(f"can only merge RidgeStats with RidgeStats, got {type(other).__name__}")
        if self.targets is not None or other.targets is not None:
            raise DumeError("statistics with per-token targets (loss-aware) cannot be merged")
        fps = (self.model_fingerprint, other.model_fingerprint)
        if None not in fps and fps[0] != fps[1]:
            raise DumeError(f"cannot merge statistics from different models: model_fingerprint "
                            f"{fps[0]!r} != {fps[1]!r}")
        for f, note in (("hidden_size", ""), ("num_layers", ""), ("num_dume_tokens", " (None means all tokens)")):
            if getattr(self, f) != getattr(other, f):
                raise DumeError(f"cannot merge statistics: {f} {getattr(self, f)} != {getattr(other, f)}{note}")
        domains = list(self.domains) + [d for d in other.domains if d not in self.domains]
        out = self._like(domains)
        out.model_fingerprint = self.model_fingerprint if self.model_fingerprint is not None else other.model_fingerprint
        if other.data_source and other.data_source != self.data_source:
            out.data_source = f"{self.data_source} + {other.data_source}" if self.data_source else other.data_source
        out.extra_meta = {**other.extra_meta, **self.extra_meta}
        k = len(self.domains)
        out.A[:, :k] = self.A
        out.s[:, :k] = self.s
        out.n[:, :k] = self.n
        for j, d in enumerate(other.domains):
            i = domains.index(d)
            out.A[:, i] += other.A[:, j].to(out.device)
            out.s[:, i] += other.s[:, j].to(out.device)
            out.n[:, i] += other.n[:, j].to(out.device)
        return out

    def __add__(self, other: RidgeStats) -> RidgeStats:
        if not isinstance(other, RidgeStats):
            return NotImplemented
        return self.merge(other)

    def select(self, domains: Sequence[str]) -> RidgeStats:
        """A new RidgeStats holding only `domains`, in that order (copies the tensors)."""
        idx = self._indices(domains)
        out = self._like([self.domains[i] for i in idx])
        out.A = self.A[:, idx].clone()
        out.n = self.n[:, idx].clone()
        if self.targets is None:
            out.s = self.s[:, idx].clone()
        else:  # the chosen domains' tokens, for the chosen experts
            out.targets = self.targets[:, idx][:, :, idx].clone()
            out.s = out.targets.sum(dim=1)
        return out

    def remove_domain(self, name: str) -> RidgeStats:
        """A new RidgeStats without `name`: exactly what collecting without it gives."""
        j = self._index(name)
        if len(self.domains) == 1:
            raise DumeError(f"cannot remove {name!r}: it is the only domain left")
        return self.select([d for i, d in enumerate(self.domains) if i != j])

    def scale_domain(self, name: str, weight: float) -> RidgeStats:
        """A new RidgeStats where `name` counts `weight` times (its A and s scaled), as if each of its tokens
        appeared `weight` times. n keeps the real token count; the centroid (s/n, normalised) is unchanged."""
        return self.scale_domains({name: weight})

    def scale_domains(self, weights: Mapping[str, float]) -> RidgeStats:
        """`scale_domain` for several domains at once (one copy of the tensors)."""
        scale = {self._index(d): _positive_finite(w, "weight") for d, w in weights.items()}
        out = self.select(self.domains)
        for j, w in scale.items():
            out.A[:, j] *= w
            if out.targets is None:
                out.s[:, j] *= w
            else:  # its tokens' share of every expert's column
                out.targets[:, j] *= w
        if out.targets is not None:
            out.s = out.targets.sum(dim=1)
        return out

    def _check_tokens(self, idx: list[int]) -> None:
        for j in idx:
            empty = (self.n[:, j] == 0).nonzero().flatten().tolist()
            if empty:
                raise DumeError(f"domain {self.domains[j]!r} has no tokens at layer(s) {empty}: collect its "
                                "statistics or leave it out (domains=...)")

    @torch.no_grad()
    def solve(self, lam: float = 0.01, domains: Sequence[str] | None = None, relative: bool = False) -> torch.Tensor:
        """DUME's router weights W [L, H, D] float64, columns of unit norm.

        Per layer: W = (Σ_d A[l,d] + λ'I)⁻¹ [s[l,d_1] … s[l,d_D]], over all domains or only `domains` (their
        order gives the columns). A + λ'I is symmetric positive definite, so a float64 Cholesky solve is both the
        fastest and the most stable. λ' = λ, or λ·trace(A)/H with relative=True: A grows with the token count
        and the feature scale, so an absolute λ = 0.01 is negligible at any realistic size and only a relative
        one means the same across settings. Columns are normalised (paper §2.3): unbalanced domains do not bias
        routing."""
        lam = _positive_finite(lam, "lambda")
        idx = self._indices(domains)
        self._check_tokens(idx)
        A = self.A[:, idx].sum(dim=1)
        A = 0.5 * (A + A.transpose(1, 2))  # float32 batch products can be asymmetric in the last bits
        b = self.s[:, idx].transpose(1, 2)  # [L, H, D]
        H = self.hidden_size
        if relative:
            trace = A.diagonal(dim1=1, dim2=2).sum(dim=1)
            if not bool((trace > 0).all()):
                bad = (trace <= 0).nonzero().flatten().tolist()
                raise DumeError(f"relative lambda needs trace(A) > 0, but layer(s) {bad} have all-zero features")
            lam_l = lam * trace / H
        else:
            lam_l = torch.full((self.num_layers,), lam, dtype=torch.float64, device=A.device)
        eye = torch.eye(H, dtype=torch.float64, device=A.device)
        M = A + lam_l[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(M)
        W = torch.cholesky_solve(b, chol)
        for layer in (info != 0).nonzero().flatten().tolist():
            W[layer] = _solve_rank_deficient(A[layer], float(lam_l[layer]), b[layer], layer)
        return _normalise_columns(W, [self.domains[i] for i in idx], "ridge solution")

    @torch.no_grad()
    def centroid(self, domains: Sequence[str] | None = None) -> torch.Tensor:
        """Each column the domain's mean router input s/n, normalised: [L, H, D] float64.

        Like mergekit's "hidden" gate, but on the oracles' MLP inputs over all the domain's text (mergekit: the
        base model's residual stream at a few prompts' last token, the `mergekit_hidden` row), and DUME's λ→∞
        limit ((A+λI)⁻¹ ≈ I/λ): a baseline that shows what the A⁻¹ whitening adds."""
        idx = self._indices(domains)
        self._check_tokens(idx)
        mean = self.s[:, idx] / self.n[:, idx, None].to(torch.float64)  # [L, D, H]
        return _normalise_columns(mean.transpose(1, 2), [self.domains[i] for i in idx], "centroid")

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path/` atomically: stats.safetensors (A, s, n) and stats.json (metadata). Only the
        λ-independent sums are stored; any λ, temperature or domain subset is solved later from them."""
        from safetensors.torch import save_file

        doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "meta": self.meta}
        try:
            json.dumps(doc)
        except (TypeError, ValueError) as e:
            raise DumeError(f"metadata is not JSON-serialisable: {e}") from e
        tensors = {k: t.detach().cpu().contiguous() for k, t in (("A", self.A), ("s", self.s), ("n", self.n),
                                                                 ("targets", self.targets)) if t is not None}
        with atomic_dir(path) as tmp:
            save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT_NAME})
            atomic_write_json(tmp / META_FILE, doc)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> RidgeStats:
        """Read statistics written by `save`, checking that tensors and metadata agree."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_dir():
            raise DumeError(f"no ridge statistics at {path} (expected a directory with {META_FILE} and {TENSORS_FILE})")
        doc = read_json(path / META_FILE)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME or not isinstance(doc.get("meta"), dict):
            raise DumeError(f"{path / META_FILE} is not a DUME ridge-statistics file")
        if doc.get("format_version") != FORMAT_VERSION:
            raise DumeError(f"{path / META_FILE} has format_version {doc.get('format_version')!r}; "
                            f"this code reads {FORMAT_VERSION}")
        meta = dict(doc["meta"])
        missing = [k for k in _CORE_META if k not in meta]
        if missing:
            raise DumeError(f"{path / META_FILE} lacks metadata keys {missing}")
        core = {k: meta.pop(k) for k in _CORE_META}
        try:  # device "meta" allocates nothing: the tensors come from the file
            stats = cls(core.pop("num_layers"), core.pop("hidden_size"), core.pop("domains"), **core,
                        extra_meta=meta, device="meta")
        except (TypeError, ValueError) as e:
            raise DumeError(f"{path / META_FILE} has invalid metadata: {e}") from e
        stats.device = torch.device(device)

        tensor_file = path / TENSORS_FILE
        if not tensor_file.is_file():
            raise DumeError(f"missing file: {tensor_file}")
        try:
            tensors = load_file(str(tensor_file), device="cpu")
        except Exception as e:  # safetensors raises its own error type for bad headers
            raise DumeError(f"corrupted statistics file {tensor_file}: {e}") from e
        L, D, H = stats.num_layers, len(stats.domains), stats.hidden_size
        expected = {"A": ((L, D, H, H), torch.float64), "s": ((L, D, H), torch.float64), "n": ((L, D), torch.int64)}
        for key, (shape, dtype) in expected.items():
            t = tensors.get(key)
            if t is None:
                raise DumeError(f"{tensor_file} has no tensor {key!r}")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise DumeError(f"{tensor_file}: tensor {key!r} is {tuple(t.shape)} {t.dtype}, but the metadata "
                                f"({L} layers, {D} domains, hidden {H}) needs {shape} {dtype}")
        if not (torch.isfinite(tensors["A"]).all() and torch.isfinite(tensors["s"]).all()):
            raise DumeError(f"{tensor_file} holds non-finite values")
        if (tensors["n"] < 0).any():
            raise DumeError(f"{tensor_file} holds negative token counts")
        stats.A, stats.s, stats.n = (tensors[k].to(stats.device) for k in ("A", "s", "n"))
        if "targets" in tensors:
            t = tensors["targets"]
            if tuple(t.shape) != (L, D, D, H) or t.dtype != torch.float64 or not torch.isfinite(t).all():
                raise DumeError(f"{tensor_file}: tensor 'targets' must be finite {(L, D, D, H)} float64")
            stats.targets = t.to(stats.device)
        elif meta.get("targets") == "loss-aware":
            raise DumeError(f"{tensor_file}: loss-aware statistics without their per-domain targets "
                            "(written before they were kept); collect them again")
        return stats


# A = Σ x xᵀ is positive semi-definite: negative eigenvalues below this fraction of the largest are the float32
# batch products' rounding, not corruption.
PSD_ROUNDING = 1e-6


def _solve_rank_deficient(A: torch.Tensor, lam: float, b: torch.Tensor, layer: int) -> torch.Tensor:
    """(A + λI)⁻¹ b when the Cholesky factorisation failed.

    That happens when the features span fewer than H directions (e.g. two tokens per document: every document's
    first position is the same BOS token) and λ is below the rounding noise of A's null-space eigenvalues. Those
    are exactly 0 in exact arithmetic, so they are clamped to 0 and the ridge solution is taken in A's eigenbasis:
    the W exact arithmetic would give. Genuinely negative eigenvalues (corrupted statistics) are still refused."""
    e, V = torch.linalg.eigh(A)
    scale = float(e.abs().max()) if e.numel() else 0.0
    if float(e.min()) < -PSD_ROUNDING * max(scale, 1e-300):
        raise DumeError(f"A + lambda*I is not positive definite at layer(s) [{layer}] (lambda'={lam:.3g}; A has "
                        f"eigenvalue {float(e.min()):.3g} against a largest {scale:.3g}); the statistics may be "
                        "corrupted, or try a larger lambda (or relative=True)")
    return V @ ((V.T @ b) / (e.clamp(min=0.0) + lam)[:, None])


def _check_domain_list(domains: Iterable[str]) -> list[str]:
    if isinstance(domains, str):
        raise DumeError(f"domains must be a list of names, got the string {domains!r}")
    names = list(domains)
    if not names:
        raise DumeError("at least one domain is needed")
    bad = [d for d in names if not isinstance(d, str) or not d]
    if bad:
        raise DumeError(f"domain names must be non-empty strings, got {bad}")
    dupes = sorted({d for d in names if names.count(d) > 1})
    if dupes:
        raise DumeError(f"duplicate domain names {dupes}")
    return names


def _positive_finite(value: float, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DumeError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise DumeError(f"{what} must be positive and finite, got {value!r}")
    return v


def _normalise_columns(W: torch.Tensor, names: list[str], what: str) -> torch.Tensor:
    """Divide each column of W [L, H, D] by its L2 norm, refusing zero or non-finite ones."""
    norms = W.norm(dim=1)  # [L, D]
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        layer, j = (int(v) for v in bad.nonzero()[0])
        raise DumeError(f"{what}: the column of domain {names[j]!r} at layer {layer} is zero or not finite "
                        "(all-zero or non-finite features for that domain?)")
    return W / norms[:, None, :]
