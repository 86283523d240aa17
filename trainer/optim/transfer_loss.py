"""Transfer losses on embedding rows (harmless transfer, Gong et al. 2022): MMD, CosReg, FRAGE, and our
co-occurrence ``neighbor`` anchor.

Pure PyTorch, no TorchRec: the trainer looks up the batch's rows of one table, splits them with
``split_rows`` into source (frequent) and target (rare) rows and calls ``loss(source, target)``.
Maths and design decisions: docs/ALGORITHMS.md §3-4.

Contract shared by all losses:
- ``loss(source_rows [m, d], target_rows [n, d]) -> scalar``, differentiable w.r.t. ``target_rows``
  only. Source rows are detached inside: the source domain is the reference distribution, and the
  frequent rows must not be pulled toward the rare ones.
- Every loss is a mean over the sampled rows (docs/ALGORITHMS.md §3 edge case 3), so its scale does not
  grow with the batch size; too few rows give a zero that still supports ``backward()``.
- ``after_step()`` is called once at the end of each training step; ``metrics()`` returns floats for
  logging / Prometheus.

Transfer rows must be a subset of the batch's unique ids (docs/ALGORITHMS.md §3 edge case 1): otherwise a
row gets h_i != 0 with g_i = 0 and the lexico rule cannot certify harmlessness. ``split_rows`` takes
the batch ids as input for exactly that reason.

FRAGE owns a discriminator and its optimizer. They live in the loss module, never in the model, so
the model's ``parameters()`` (and the dense/embedding optimizers) never see them. The trainer must
checkpoint ``loss_module.state_dict()`` next to the model; it carries the discriminator weights and,
through ``get_extra_state``, the discriminator optimizer's state and step counter.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TransferLoss",
    "MMDLoss",
    "CosRegLoss",
    "FrageLoss",
    "NeighborLoss",
    "build_transfer_loss",
    "split_rows",
]

# Points used to estimate the median distance; beyond this the O(N^2) median dominates the loss cost
# and a strided subsample gives the same bandwidth to within noise.
MEDIAN_MAX_POINTS = 2048


def _zero_like_graph(*ts: Tensor) -> Tensor:
    """A scalar 0 that is connected to the inputs' graph, so callers can always ``backward()``."""
    z = None
    for t in ts:
        s = t.sum() * 0.0
        z = s if z is None else z + s
    return z  # type: ignore[return-value]


def _as_float(x: Tensor) -> Tensor:
    # fp16/bf16 rows (possible with fused TBE weights) lose too much in exp/normalise; compute in fp32.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_rows(source_rows: Tensor, target_rows: Tensor) -> None:
    if source_rows.dim() != 2 or target_rows.dim() != 2:
        raise ValueError(f"rows must be 2-D [N, d], got {tuple(source_rows.shape)} and {tuple(target_rows.shape)}")
    if source_rows.shape[1] != target_rows.shape[1]:
        raise ValueError(f"source dim {source_rows.shape[1]} != target dim {target_rows.shape[1]}")


class TransferLoss(nn.Module):
    """Base class: ``loss(source_rows, target_rows)``, ``after_step()``, ``metrics()``."""

    name = "base"
    paired = False      # True: source_rows[j] is the anchor of target_rows[j] (NeighborLoss)

    def loss(self, source_rows: Tensor, target_rows: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, source_rows: Tensor, target_rows: Tensor, *args: Any) -> Tensor:
        return self.loss(source_rows, target_rows, *args)

    def after_step(self) -> None:
        """End-of-training-step hook; stateless losses need nothing."""

    def metrics(self) -> dict[str, float]:
        return {"transfer_loss": self._last()}

    def _record(self, value: Tensor) -> Tensor:
        # .item() would sync a GPU stream every step; keep the tensor, convert lazily in metrics().
        self._last_loss_t = value.detach()
        return value

    def _last(self) -> float:
        t = getattr(self, "_last_loss_t", None)
        return float(t) if t is not None else math.nan


# ----------------------------------------------------------------------------------------------- MMD
def _sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """||x_i - y_j||^2 in O(N*M*d) memory-light form; clamped because cancellation can go below 0."""
    xx = (x * x).sum(1, keepdim=True)
    yy = (y * y).sum(1, keepdim=True)
    return (xx + yy.T - 2.0 * (x @ y.T)).clamp_min(0.0)


def median_pairwise_distance(points: Tensor, max_points: int = MEDIAN_MAX_POINTS) -> Tensor:
    """Lower median of the distances ||p_i - p_j||, i < j (detached). Strided subsample above ``max_points``."""
    p = points.detach()
    if p.shape[0] > max_points:
        # Deterministic stride, not random: the bandwidth must not depend on the global RNG.
        idx = torch.linspace(0, p.shape[0] - 1, max_points, device=p.device).round().long()
        p = p[idx]
    n = p.shape[0]
    if n < 2:
        return torch.ones((), dtype=p.dtype, device=p.device)
    d2 = _sq_dists(p, p)
    iu = torch.triu_indices(n, n, offset=1, device=p.device)
    return d2[iu[0], iu[1]].median().sqrt()


class MMDLoss(TransferLoss):
    """Unbiased MMD^2_u with a multi-bandwidth RBF kernel (docs/ALGORITHMS.md §4).

    k(x, y) = sum_{c in scales} exp(-||x - y||^2 / (2 (c sigma0)^2)), sigma0 = median pairwise distance
    of the union of both sets (detached; it sets the kernel's scale, it is not optimised).
    """

    name = "mmd"

    def __init__(self, sigma_scales: list[float] | tuple[float, ...] = (0.5, 1.0, 2.0),
                 median_max_points: int = MEDIAN_MAX_POINTS) -> None:
        super().__init__()
        if not sigma_scales or any(s <= 0 for s in sigma_scales):
            raise ValueError(f"mmd sigma scales must be positive, got {sigma_scales}")
        self.sigma_scales = [float(s) for s in sigma_scales]
        self.median_max_points = median_max_points

    def _kernel(self, d2: Tensor, sigma0: Tensor) -> Tensor:
        k = torch.zeros_like(d2)
        for c in self.sigma_scales:
            k = k + torch.exp(-d2 / (2.0 * (c * sigma0) ** 2))
        return k

    def loss(self, source_rows: Tensor, target_rows: Tensor) -> Tensor:
        _check_rows(source_rows, target_rows)
        s = _as_float(source_rows).detach()
        t = _as_float(target_rows)
        m, n = s.shape[0], t.shape[0]
        if m < 2 or n < 2:
            # MMD^2_u needs two points per side for its within-set terms.
            return self._record(_zero_like_graph(t))
        sigma0 = median_pairwise_distance(torch.cat([s, t.detach()]), self.median_max_points)
        # All points identical -> sigma0 = 0: any positive bandwidth gives MMD = 0 exactly; avoid 0/0.
        sigma0 = torch.where(sigma0 > 0, sigma0, torch.ones_like(sigma0))
        self._sigma0_t = sigma0
        k_ss = self._kernel(_sq_dists(s, s), sigma0)
        k_tt = self._kernel(_sq_dists(t, t), sigma0)
        k_st = self._kernel(_sq_dists(s, t), sigma0)
        # Off-diagonal sums: subtract the diagonal (k(x, x) = len(scales) exactly) instead of masking.
        kdiag = float(len(self.sigma_scales))
        term_ss = (k_ss.sum() - kdiag * m) / (m * (m - 1))
        term_tt = (k_tt.sum() - kdiag * n) / (n * (n - 1))
        term_st = k_st.sum() * (2.0 / (m * n))
        return self._record(term_ss + term_tt - term_st)

    def metrics(self) -> dict[str, float]:
        sig = getattr(self, "_sigma0_t", None)
        return {"transfer_loss": self._last(), "mmd_sigma0": float(sig) if sig is not None else math.nan}


# -------------------------------------------------------------------------------------------- CosReg
class CosRegLoss(TransferLoss):
    """Cosine regularisation (Gao et al. 2019), the harmless paper's CosReg, in two forms.

    * ``form="batch_mean"`` (ours): R = ||mean_i w_i/||w_i|| ||^2 = (1/N^2) sum_i sum_j cos(w_i, w_j) over
      the batch's target rows (and the detached source rows when ``include_source``), diagonal included.
    * ``form="paper"``: the paper's (1/(N(N-1))) sum_i sum_{j != i} cos(w_i, w_j), averaged over distinct
      pairs of every sampled row, target and (detached) source: (||sum_i u_i||^2 - N) / (N (N - 1)).
      The paper sums over the whole vocabulary; we sample the batch's rows, as every transfer loss here.
    Both cost O(N d) through the sum of unit vectors.
    """

    name = "cosreg"
    FORMS = ("batch_mean", "paper")

    def __init__(self, include_source: bool = False, eps: float = 1e-12, form: str = "batch_mean") -> None:
        super().__init__()
        if form not in self.FORMS:
            raise ValueError(f"cosreg form {form!r} not in {self.FORMS}")
        self.include_source = include_source or form == "paper"
        self.form = form
        self.eps = eps

    def loss(self, source_rows: Tensor, target_rows: Tensor) -> Tensor:
        _check_rows(source_rows, target_rows)
        t = F.normalize(_as_float(target_rows), dim=1, eps=self.eps)
        if self.include_source:
            s = F.normalize(_as_float(source_rows).detach(), dim=1, eps=self.eps)
            total = t.sum(0) + s.sum(0)
            count = t.shape[0] + s.shape[0]
        else:
            total, count = t.sum(0), t.shape[0]
        if t.shape[0] == 0 or (self.form == "paper" and count < 2):
            # Nothing to regularise (a source-only term has no trainable rows; one row has no pair).
            return self._record(_zero_like_graph(target_rows))
        if self.form == "paper":
            return self._record(((total * total).sum() - count) / (count * (count - 1)))
        mean = total / count
        return self._record((mean * mean).sum())


# ------------------------------------------------------------------------------------------ neighbor
class NeighborLoss(TransferLoss):
    """Ours: pull each rare row toward its co-occurrence neighbor's row (docs/ALGORITHMS.md §4).

    ``loss(anchors [n, d], target_rows [n, d])``: the rows are *paired* (``paired = True``): anchor j is
    the current (detached) row of the source id whose co-occurrence profile is closest to target j's
    (``data.selective``: neighbor(i) = argmax_{s in S} cos(c_i, c_s)). l = mean_j 1/2 ||t_j - a_j||^2.
    The distribution-level losses (MMD, CosReg, FRAGE) move the rare rows toward *some* frequent region;
    this one moves each toward the one frequent id it resembles, the prior a cold-start id needs.
    """

    name = "neighbor"
    paired = True

    def loss(self, source_rows: Tensor, target_rows: Tensor, weights: Tensor | None = None) -> Tensor:
        """``weights`` [n] (optional): per-row strength w_j, l = (1/n) sum_j w_j 1/2 ||t_j - a_j||^2."""
        _check_rows(source_rows, target_rows)
        if source_rows.shape[0] != target_rows.shape[0]:
            raise ValueError(f"neighbor loss pairs rows: {source_rows.shape[0]} anchors for {target_rows.shape[0]} rows")
        t = _as_float(target_rows)
        if t.shape[0] == 0:
            return self._record(_zero_like_graph(target_rows))
        a = _as_float(source_rows).detach()
        per_row = 0.5 * (t - a).square().sum(1)
        if weights is not None:
            per_row = per_row * weights.to(per_row.dtype)
        return self._record(per_row.mean())

    def set_coverage(self, covered: Tensor) -> None:
        """Fraction of the batch's target rows whose neighbor row was in the batch (kept as a tensor)."""
        self._coverage_t = covered.detach()

    def metrics(self) -> dict[str, float]:
        cov = getattr(self, "_coverage_t", None)
        return {"transfer_loss": self._last(), "anchor_coverage": float(cov) if cov is not None else math.nan}


# --------------------------------------------------------------------------------------------- FRAGE
class FrageLoss(TransferLoss):
    """FRAGE adversarial transfer (Gong et al. 2018; docs/ALGORITHMS.md §4).

    Discriminator D: ``nn.Linear(dim, 2)`` (official code), or ``Linear-ReLU-Linear`` when
    ``hidden > 0``; init U(-0.1, 0.1); its own SGD optimizer. Label 0 = source, 1 = target.
    - ``discriminator_step(src, tgt)``: one D update with balanced CE 1/2[CE(D(src), 0) + CE(D(tgt), 1)]
      on detached rows; returns D's balanced accuracy on that batch (measured before the update).
    - ``loss(src, tgt)`` = CE(D(tgt), 0): target rows try to look like source rows. Non-saturating and
      bounded below by 0, unlike -CE. D's weights are used detached, so the generator's backward
      leaves no gradient on D.
    - ``after_step()``: if no ``discriminator_step`` ran during this training step, run one on the rows
      cached by the last ``loss()`` call; so the trainer may call either, and D gets exactly one update.

    Under torch.distributed (world > 1) the D gradients are averaged across ranks, so D stays identical
    everywhere (same seed -> same init). Every rank must then call the D step each step (it does, via
    ``after_step``, even with no rows: zero gradients).
    """

    name = "frage"

    def __init__(self, dim: int, lr: float = 0.02, hidden: int = 0, weight_decay: float = 0.0,
                 init_range: float = 0.1, seed: int | None = None, sync_distributed: bool = True,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.dim = dim
        if hidden > 0:
            self.discriminator: nn.Module = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        else:
            self.discriminator = nn.Linear(dim, 2)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for p in self.discriminator.parameters():
                # Draw on CPU with our own generator: identical init on every rank and device.
                p.copy_(torch.empty(p.shape).uniform_(-init_range, init_range, generator=gen))
        self.discriminator.to(device)
        # Built after the move so it holds the on-device parameters.
        self.optimizer = torch.optim.SGD(self.discriminator.parameters(), lr=lr, weight_decay=weight_decay)
        self.sync_distributed = sync_distributed
        self.d_steps = 0
        self._stepped_this_step = False
        self._cached: tuple[Tensor, Tensor] | None = None
        self._last_acc = math.nan
        self._last_d_loss = math.nan

    def _d_detached(self, x: Tensor) -> Tensor:
        params = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, params, (x,))

    def _d_dtype(self) -> torch.dtype:
        return next(self.discriminator.parameters()).dtype

    def loss(self, source_rows: Tensor, target_rows: Tensor) -> Tensor:
        _check_rows(source_rows, target_rows)
        # Cache detached copies for after_step's D update (cheap: a batch's rows, no graph).
        self._cached = (source_rows.detach(), target_rows.detach())
        if target_rows.shape[0] == 0:
            return self._record(_zero_like_graph(target_rows))
        logits = self._d_detached(target_rows.to(self._d_dtype()))
        labels = torch.zeros(target_rows.shape[0], dtype=torch.long, device=target_rows.device)
        return self._record(F.cross_entropy(logits, labels))

    def discriminator_step(self, source_rows: Tensor, target_rows: Tensor) -> float:
        """One SGD step of D on detached rows; returns balanced accuracy (nan if both sides empty)."""
        _check_rows(source_rows, target_rows)
        dt = self._d_dtype()
        s = source_rows.detach().to(dt)
        t = target_rows.detach().to(dt)
        self.optimizer.zero_grad(set_to_none=False)
        terms, accs = [], []
        with torch.enable_grad():
            for rows, label in ((s, 0), (t, 1)):
                if rows.shape[0] == 0:
                    continue
                logits = self.discriminator(rows)
                y = torch.full((rows.shape[0],), label, dtype=torch.long, device=rows.device)
                terms.append(F.cross_entropy(logits, y))
                accs.append((logits.detach().argmax(1) == y).float().mean())
            if terms:
                # Balanced: each domain weighs 1/2 whatever its row count (source is usually smaller).
                d_loss = sum(terms) / len(terms)
                d_loss.backward()
            else:
                d_loss = None
        self._sync_grads()
        if d_loss is not None or self._distributed():
            self.optimizer.step()
        self.d_steps += 1
        self._stepped_this_step = True
        acc = torch.stack(accs).mean() if accs else None
        self._last_acc = float(acc) if acc is not None else math.nan
        self._last_d_loss = float(d_loss.detach()) if d_loss is not None else math.nan
        return self._last_acc

    def _distributed(self) -> bool:
        import torch.distributed as dist

        return (self.sync_distributed and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)

    def _sync_grads(self) -> None:
        if not self._distributed():
            return
        import torch.distributed as dist

        world = dist.get_world_size()
        for p in self.discriminator.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(world)

    def after_step(self) -> None:
        if not self._stepped_this_step:
            if self._cached is not None:
                self.discriminator_step(*self._cached)
            elif self._distributed():
                # Other ranks may have rows: join their all-reduce with zero gradients.
                p = next(self.discriminator.parameters())
                empty = torch.empty(0, self.dim, dtype=p.dtype, device=p.device)
                self.discriminator_step(empty, empty)
        self._stepped_this_step = False
        self._cached = None

    def metrics(self) -> dict[str, float]:
        return {"transfer_loss": self._last(), "frage_d_acc": self._last_acc,
                "frage_d_loss": self._last_d_loss, "frage_d_steps": float(self.d_steps)}

    # Optimizer state + counter ride along in state_dict() so a resumed run continues exactly.
    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "d_steps": self.d_steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.d_steps = int(state["d_steps"])


# ------------------------------------------------------------------------------------------- factory
def build_transfer_loss(cfg: Any, dim: int, device: torch.device | str = "cpu", *,
                        seed: int | None = None) -> TransferLoss:
    """The transfer loss named by ``cfg.loss`` (a ``TransferConfig``), on ``device``.

    Optional knobs read with defaults so older configs keep working: ``frage_hidden`` (0 = linear D),
    ``frage_weight_decay``, ``cosreg_include_source``. Pass the run seed for a reproducible D init that
    is identical on all ranks.
    """
    name = cfg.loss
    if name == "mmd":
        mod: TransferLoss = MMDLoss(list(cfg.mmd_sigma_scales))
    elif name == "cosreg":
        mod = CosRegLoss(include_source=bool(getattr(cfg, "cosreg_include_source", False)),
                         form=str(getattr(cfg, "cosreg_form", "batch_mean")))
    elif name == "neighbor":
        mod = NeighborLoss()
    elif name == "frage":
        mod = FrageLoss(dim, lr=float(cfg.frage_lr), hidden=int(getattr(cfg, "frage_hidden", 0)),
                        weight_decay=float(getattr(cfg, "frage_weight_decay", 0.0)), seed=seed,
                        device=device)
    else:
        raise ValueError(f"unknown transfer loss {name!r}; expected one of mmd, cosreg, frage, neighbor")
    return mod


# ----------------------------------------------------------------------------------------- row split
def split_rows(ids: Tensor, is_source: Tensor, in_target: Tensor | None = None,
               check: bool = True) -> tuple[Tensor, Tensor]:
    """Masks over ``ids`` (a batch's unique ids for one table) choosing each side of the transfer loss.

    ``is_source[i]``: id i is in the source domain (top ``source_frac`` by count). ``in_target[i]``: id i
    is in the target domain (the rest, or T'_eta with the selective domain); ``None`` = every non-source
    id. Both are per id of the whole table (global ids). A source id is never a target even if
    ``in_target`` says so. Returns ``(source_mask, target_mask)``, bool, shaped like ``ids``. Pass
    unique ids: a duplicated id would weigh twice in the loss's mean. ``check=False`` skips the id range
    check (it syncs a GPU stream).
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if is_source.dtype != torch.bool or (in_target is not None and in_target.dtype != torch.bool):
        raise TypeError("is_source / in_target must be bool tensors")
    if in_target is not None and in_target.shape != is_source.shape:
        raise ValueError(f"is_source {tuple(is_source.shape)} and in_target {tuple(in_target.shape)} differ")
    if ids.numel() == 0:
        empty = torch.zeros(0, dtype=torch.bool, device=ids.device)
        return empty, empty.clone()
    lo, hi = (int(ids.min()), int(ids.max())) if check else (0, 0)
    if lo < 0 or hi >= is_source.shape[0]:
        raise IndexError(f"ids in [{lo}, {hi}] outside the table's {is_source.shape[0]} rows")
    idx = ids.long()
    src = is_source.to(ids.device)[idx]
    tgt = ~src if in_target is None else in_target.to(ids.device)[idx] & ~src
    return src, tgt
