"""The contrastive losses computed in row blocks (core, pure tensor math): memory that grows with B, not B².

``blockwise_clip_loss`` / ``blockwise_siglip_loss`` (and the per-rows forms ``loss.local`` uses under torchrun)
equal ``align.train.losses``' ``clip_loss`` / ``siglip_loss`` and their gradients, to floating-point rounding, but
never hold the B × B logits: the forward pass computes (block × B) logits at a time and keeps only B-vectors (CLIP:
the log-sum-exp of every row, image → text, and of every column, text → image, accumulated over the blocks; SigLIP:
the sum), and the backward pass recomputes each block's logits and accumulates the gradients of the image features,
the text features, the logit scale (and SigLIP's bias). Nothing of size B² is saved for the backward pass.

Each loss is a ``torch.autograd.Function`` written in the ``setup_context`` form with ``generate_vmap_rule``, so a
``HeadPack`` runs it under ``torch.func.vmap`` over its K heads (the blocks then hold K × block × B values) and
differentiates it with ``torch.autograd.grad``. Its backward is itself a Function whose backward gives the second
derivative in blocks too: the sharpness measures (Hessian–vector products) work on it without B² either. Inputs in
bfloat16 or float16 (autocast on CUDA) are computed in float32 inside, float64 stays float64.

The block size (``loss_block_rows``): ``loss.block_rows`` when set; automatically, the whole matrix at once (the
plain loss, no blocks) while the K heads' (rows × columns) float32 logits fit in ``LOGITS_BUDGET``, and otherwise
the most rows whose K × block × columns float32 logits do. The training step holds ``BLOCK_COPIES`` such matrices
at once (the logits and the softmax weights; ``align.train.memory`` counts them).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

LOGITS_BUDGET = 256 * 2 ** 20  # bytes of float32 logits (all heads of a pack together) computed at once
LOGIT_BYTES = 4  # the logits are float32 (bf16 inputs are computed in float32 inside)
BLOCK_COPIES = 2  # (block × B) matrices a blocked training step holds at once, per head: logits and weights


def loss_block_rows(setting: int | None, rows: int, columns: int, heads: int = 1) -> int | None:
    """Rows per block of a loss over (rows × columns) logits computed for ``heads`` heads at once, or None for
    the whole matrix at once (the plain loss). ``setting`` is ``loss.block_rows``: a number forces the block (None
    when it covers every row), None chooses it from ``LOGITS_BUDGET``."""
    if setting is not None:
        return None if setting >= rows else int(setting)
    per_row = heads * columns * LOGIT_BYTES
    if rows * per_row <= LOGITS_BUDGET:
        return None
    return max(1, LOGITS_BUDGET // per_row)


# -- the losses --------------------------------------------------------------------------------------------------

def blockwise_clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                        block_rows: int) -> Tensor:
    """``clip_loss`` (symmetric InfoNCE, mean over B) computed ``block_rows`` image rows at a time."""
    x, y, s = _wide(image_features, text_features, logit_scale)
    half = 0.5 / x.shape[0]
    with _exact(x):
        return _SoftmaxBlocks.apply(x, y, s, _Spec(0, block_rows, half, half))[0]


def blockwise_clip_loss_rows(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                             rows: slice, block_rows: int) -> Tensor:
    """``clip_loss_rows`` (the part of the loss owned by ``rows``) computed ``block_rows`` rows at a time."""
    x, y, s = _wide(image_features, text_features, logit_scale)
    half = 0.5 / (rows.stop - rows.start)
    with _exact(x):
        spec = _Spec(rows.start, block_rows, half)
        per_image = _SoftmaxBlocks.apply(x[rows], y, s, spec)[0]
        per_text = _SoftmaxBlocks.apply(y[rows], x, s, spec)[0]
    return per_image + per_text


def blockwise_siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                          logit_bias: Tensor | float, block_rows: int) -> Tensor:
    """``siglip_loss`` (sum over all pairs / B) computed ``block_rows`` image rows at a time."""
    x, y, s, b = _wide(image_features, text_features, logit_scale, logit_bias)
    with _exact(x):
        return _SigmoidBlocks.apply(x, y, s, b, _Spec(0, block_rows, 1.0 / x.shape[0]))


def blockwise_siglip_loss_rows(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
                               logit_bias: Tensor | float, rows: slice, block_rows: int) -> Tensor:
    """``siglip_loss_rows`` (those images against all texts, over the rows' count), ``block_rows`` at a time."""
    x, y, s, b = _wide(image_features, text_features, logit_scale, logit_bias)
    with _exact(x):
        return _SigmoidBlocks.apply(x[rows], y, s, b, _Spec(rows.start, block_rows, 1.0 / (rows.stop - rows.start)))


def _wide(features: Tensor, *rest: Tensor | float) -> list[Tensor]:
    """The inputs as tensors of one dtype, float32 at least (bf16 autocast's features are computed in float32)."""
    dtype = torch.promote_types(torch.promote_types(features.dtype, rest[0].dtype), torch.float32)
    return [t.to(dtype) if isinstance(t, Tensor) else torch.tensor(float(t), dtype=dtype, device=features.device)
            for t in (features, *rest)]


def _exact(like: Tensor) -> AbstractContextManager:
    """Autocast off on ``like``'s device: the blocks are computed in the inputs' (wide) dtype."""
    return torch.autocast(device_type=like.device.type, enabled=False)


class _Spec(NamedTuple):
    """What a blockwise Function computes besides its tensors: queries' positives at keys lo + i, the row-block
    size, and the weights of the row terms and (CLIP over the whole batch) of the column terms."""

    lo: int
    block: int
    row_weight: float
    col_weight: float = 0.0

    def starts(self, rows: int) -> range:
        return range(0, rows, self.block)


# -- softmax cross-entropy (CLIP) --------------------------------------------------------------------------------
#
# Logits L = s q kᵀ of queries q (n × D) against keys k (B × D); query i's positive key is lo + i. The loss is
#   wr Σ_i (lse_j L_ij − L_i,lo+i) + wc Σ_j (lse_i L_ij − L_jj)          (wc only for a square L, lo = 0)
# so CLIP's mean over both directions is wr = wc = 1/(2B), and one direction of a rank's rows wr = 1/(2n), wc = 0.
# Its gradient with respect to L is  G = wr P + wc Q − (wr + wc) E,  P the row softmax, Q the column softmax and E
# the positives; then ∂q = s G k, ∂k = s Gᵀ q, ∂s = Σ G ∘ q kᵀ.

class _SoftmaxBlocks(torch.autograd.Function):
    """(loss, row log-sum-exps, column log-sum-exps) of the weighted cross-entropy above, in row blocks."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, s: Tensor, spec: _Spec) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        row_lse, col_lse = [], None
        for a in spec.starts(q.shape[0]):
            logits = (s * q[a:a + spec.block]) @ k.T
            row_lse.append(torch.logsumexp(logits, dim=1))
            if spec.col_weight:
                part = torch.logsumexp(logits, dim=0)
                col_lse = part if col_lse is None else torch.logaddexp(col_lse, part)
        rows = torch.cat(row_lse)
        positive = ((s * q) * k[spec.lo:spec.lo + q.shape[0]]).sum(-1)
        loss = spec.row_weight * (rows - positive).sum()
        if col_lse is None:
            col_lse = rows[:0]  # no column softmax: an empty placeholder
        else:
            loss = loss + spec.col_weight * (col_lse - positive).sum()
        return loss, rows, col_lse

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, s, ctx.spec = inputs
        _, row_lse, col_lse = output
        ctx.mark_non_differentiable(row_lse, col_lse)
        ctx.save_for_backward(q, k, s, row_lse, col_lse)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Tensor) -> tuple:  # type: ignore[override]
        q, k, s, row_lse, col_lse = ctx.saved_tensors
        dq, dk, ds = _SoftmaxGrads.apply(q, k, s, row_lse, col_lse, grad, ctx.spec)
        return dq, dk, ds, None


def _softmax_probabilities(q: Tensor, k: Tensor, s: Tensor, row_lse: Tensor, col_lse: Tensor,
                           wc: float) -> tuple[Tensor, Tensor | None]:
    """A block's row softmax P and (wc ≠ 0) column softmax Q, from the log-sum-exps of the forward pass."""
    logits = (s * q) @ k.T
    p = (logits - row_lse[:, None]).exp_()
    return p, (logits.sub_(col_lse).exp_() if wc else None)


def _softmax_weights(q: Tensor, k: Tensor, s: Tensor, row_lse: Tensor, col_lse: Tensor, offset: int,
                     spec: _Spec) -> Tensor:
    """A block's ∂loss/∂L = wr P + wc Q − (wr + wc) E, overwriting P (two block matrices at once)."""
    wr, wc = spec.row_weight, spec.col_weight
    p, col = _softmax_probabilities(q, k, s, row_lse, col_lse, wc)
    weights = p.mul_(wr)
    if col is not None:
        weights.add_(col, alpha=wc)
    torch.diagonal(weights, offset=offset).sub_(wr + wc)
    return weights


class _SoftmaxGrads(torch.autograd.Function):
    """(∂q, ∂k, ∂s) of ``_SoftmaxBlocks``' loss times ``grad``, in row blocks; its backward is the second derivative
    (for Hessian–vector products), in row blocks as well."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, s: Tensor, row_lse: Tensor, col_lse: Tensor,  # type: ignore[override]
                grad: Tensor, spec: _Spec) -> tuple[Tensor, Tensor, Tensor]:
        with _exact(q):
            dq, dk, ds, _ = _first_order(q, k, spec, lambda a, qa: _softmax_weights(
                qa, k, s, row_lse[a:a + spec.block], col_lse, spec.lo + a, spec))
        return grad * s * dq, grad * s * dk, grad * ds

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, s, row_lse, col_lse, grad, ctx.spec = inputs
        ctx.save_for_backward(q, k, s, row_lse, col_lse, grad)

    @staticmethod
    def backward(ctx: Any, uq: Tensor, uk: Tensor, us: Tensor) -> tuple:  # type: ignore[override]
        q, k, s, row_lse, col_lse, grad = ctx.saved_tensors
        lo, block, wr, wc = ctx.spec
        with _exact(q):
            second = _SecondOrder(q, k, s, uq, uk, us)
            col_dot = None  # c_j = Σ_i Q_ij W_ij, over every block before the gradients can use it
            if wc:
                for a in ctx.spec.starts(q.shape[0]):
                    _, col = _softmax_probabilities(q[a:a + block], k, s, row_lse[a:a + block], col_lse, wc)
                    part = (col * second.w(a, block)).sum(0)
                    col_dot = part if col_dot is None else col_dot + part
            for a in ctx.spec.starts(q.shape[0]):
                p, col = _softmax_probabilities(q[a:a + block], k, s, row_lse[a:a + block], col_lse, wc)
                w = second.w(a, block)
                weights = p * wr + (col * wc if col is not None else 0.0)
                torch.diagonal(weights, offset=lo + a).sub_(wr + wc)
                z = p.mul_(w - (p * w).sum(1, keepdim=True)).mul_(wr)  # ∂Φ/∂L: the row softmax's part ...
                if col is not None:  # ... and the column softmax's
                    z.add_(col.mul_(w - col_dot), alpha=wc)
                second.add(a, block, weights, w, z)
        dq, dk, ds, _, dgrad = second.result(grad)
        return dq, dk, ds, None, None, dgrad, None


# -- sigmoid pair loss (SigLIP) ----------------------------------------------------------------------------------
#
# Logits L = s q kᵀ + b; the loss is −w Σ_ij log σ(±L_ij) (+ on the positives i, lo + i; w the row weight: 1 / n
# for n queries), so ∂loss/∂L = w (σ(L) − E).

class _SigmoidBlocks(torch.autograd.Function):
    """The sigmoid pair loss of queries q against keys k, in row blocks."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, s: Tensor, b: Tensor, spec: _Spec) -> Tensor:  # type: ignore[override]
        total = None
        for a in spec.starts(q.shape[0]):
            signed = ((s * q[a:a + spec.block]) @ k.T + b).neg_()  # −L off the positives, +L on them:
            torch.diagonal(signed, offset=spec.lo + a).neg_()
            part = -F.logsigmoid(signed).sum()
            total = part if total is None else total + part
        return total * spec.row_weight

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        q, k, s, b, ctx.spec = inputs
        ctx.save_for_backward(q, k, s, b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:  # type: ignore[override]
        q, k, s, b = ctx.saved_tensors
        dq, dk, ds, db = _SigmoidGrads.apply(q, k, s, b, grad, ctx.spec)
        return dq, dk, ds, db, None


def _sigmoid_weights(q: Tensor, k: Tensor, s: Tensor, b: Tensor, offset: int, w: float) -> tuple[Tensor, Tensor]:
    """A block's σ(L) and ∂loss/∂L = w (σ(L) − E) (the positives' −w σ(−L) taken as such, not as w (σ − 1))."""
    logits = (s * q) @ k.T + b
    positive = -torch.sigmoid(-torch.diagonal(logits, offset=offset)) * w
    sigma = logits.sigmoid_()
    weights = sigma * w
    torch.diagonal(weights, offset=offset).copy_(positive)
    return sigma, weights


class _SigmoidGrads(torch.autograd.Function):
    """(∂q, ∂k, ∂s, ∂b) of ``_SigmoidBlocks``' loss times ``grad``, in row blocks; its backward is the second
    derivative, in row blocks as well."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, s: Tensor, b: Tensor, grad: Tensor,  # type: ignore[override]
                spec: _Spec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with _exact(q):
            dq, dk, ds, db = _first_order(q, k, spec, lambda a, qa: _sigmoid_weights(
                qa, k, s, b, spec.lo + a, spec.row_weight)[1], bias=True)
        return grad * s * dq, grad * s * dk, grad * ds, grad * db

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, s, b, grad, ctx.spec = inputs
        ctx.save_for_backward(q, k, s, b, grad)

    @staticmethod
    def backward(ctx: Any, uq: Tensor, uk: Tensor, us: Tensor, ub: Tensor) -> tuple:  # type: ignore[override]
        q, k, s, b, grad = ctx.saved_tensors
        lo, block, weight, _ = ctx.spec
        with _exact(q):
            second = _SecondOrder(q, k, s, uq, uk, us, ub)
            for a in ctx.spec.starts(q.shape[0]):
                sigma, weights = _sigmoid_weights(q[a:a + block], k, s, b, lo + a, weight)
                w = second.w(a, block)
                second.add(a, block, weights, w, sigma.mul_(1 - sigma).mul_(w).mul_(weight))
        dq, dk, ds, db, dgrad = second.result(grad)
        return dq, dk, ds, db, dgrad, None


# -- what both losses share --------------------------------------------------------------------------------------

def _first_order(q: Tensor, k: Tensor, spec: _Spec, weights_of: Any,
                 bias: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Σ over row blocks of G = ∂loss/∂L (``weights_of(start, rows)``): (G k, Gᵀ q, Σ G ∘ q kᵀ, Σ G if ``bias``),
    which the Functions scale into ∂q, ∂k, ∂s and ∂b."""
    gk, dk, ds, db = [], torch.zeros_like(k), None, None
    for a in spec.starts(q.shape[0]):
        qa = q[a:a + spec.block]
        weights = weights_of(a, qa)
        part = weights @ k
        gk.append(part)
        dk = dk + weights.T @ qa
        ds = (qa * part).sum() if ds is None else ds + (qa * part).sum()
        if bias:
            db = weights.sum() if db is None else db + weights.sum()
    return torch.cat(gk), dk, ds, db


class _SecondOrder:
    """The backward of a Grads Function, block by block: the cotangents (uq, uk, us[, ub]) of its outputs (∂q, ∂k,
    ∂s[, ∂b]) make Φ = Σ G ∘ W with W = s (uq kᵀ + q ukᵀ) + us q kᵀ (+ ub); with Z = ∂Φ/∂L (the loss's own part)
    the derivatives of Φ are  q: G (s uk + us k) + s Z k,  k: Gᵀ (s uq + us q) + s Zᵀ q,
    s: Σ G ∘ (uq kᵀ + q ukᵀ) + Σ Z ∘ q kᵀ,  b: Σ Z,  and grad: Φ / grad (G and Z taken at grad = 1)."""

    def __init__(self, q: Tensor, k: Tensor, s: Tensor, uq: Tensor, uk: Tensor, us: Tensor,
                 ub: Tensor | None = None) -> None:
        self.q, self.k, self.s, self.uq, self.uk, self.us, self.ub = q, k, s, uq, uk, us, ub
        self.left = s * uq + us * q  # W = left kᵀ + (s q) ukᵀ (+ ub)
        self.keys = s * uk + us * k  # G's partner on the key side
        self.dq: list[Tensor] = []
        self.dk = torch.zeros_like(k)
        self.ds = self.db = self.phi = torch.zeros_like(s)

    def w(self, a: int, block: int) -> Tensor:
        """Rows [a, a + block) of W."""
        w = self.left[a:a + block] @ self.k.T + (self.s * self.q[a:a + block]) @ self.uk.T
        return w if self.ub is None else w + self.ub

    def add(self, a: int, block: int, weights: Tensor, w: Tensor, z: Tensor) -> None:
        """One block's share, from its G (``weights``, at grad = 1), W and Z."""
        qa, uqa, s = self.q[a:a + block], self.uq[a:a + block], self.s
        zk, gk = z @ self.k, weights @ self.k
        self.dq.append(weights @ self.keys + s * zk)
        self.dk = self.dk + weights.T @ self.left[a:a + block] + s * (z.T @ qa)
        self.ds = self.ds + (uqa * gk).sum() + (qa * (weights @ self.uk)).sum() + (qa * zk).sum()
        self.db = self.db + z.sum()
        self.phi = self.phi + (weights * w).sum()

    def result(self, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(∂q, ∂k, ∂s, ∂b, ∂grad) of Φ."""
        return grad * torch.cat(self.dq), grad * self.dk, grad * self.ds, grad * self.db, self.phi
