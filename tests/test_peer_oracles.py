"""GSAM, Friendly SAM, LookSAM and Lion against their peer implementations in pytorch_optimizer and against
independent float64 transcriptions of their papers: 20 steps of a small two-layer model on fixed batches, with the
lr schedule of training (linear warm-up, cosine to 0).

Where the papers and pytorch_optimizer disagree, align follows the paper and the tests below show the difference:
- Friendly SAM: the paper updates m before it forms d = g − σ m and defines m by its recursion (m₀ = 0); the authors'
  code and pytorch_optimizer form d from the previous m and start m at the first gradient. A subclass of ours with
  only that changed equals pytorch_optimizer.
- LookSAM: the paper's norms and projection are over the whole parameter vector; pytorch_optimizer takes them tensor
  by tensor. On a model whose weights are one tensor the two agree, and ours equals pytorch_optimizer there.
pytorch_optimizer computes the SAM family's gradient norm in float32 (``get_global_gradient_norm`` casts); the
float64 comparisons give it the float64 norm (``float64_norms``), a precision setting, not a method difference.
"""
from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

from align.optim import SAM, FriendlySAM, GSAM, Lion, LookSAM, create_optimizer
from align.optim.registry import default_hparams
from align.optim.two_pass import norm_of
from align.train.run_data import lr_factor

po = pytest.importorskip("pytorch_optimizer")  # the test extra: pip install -e ".[test]"
po_sam = pytest.importorskip("pytorch_optimizer.optimizer.sam")

D = torch.float64
STEPS, WARMUP = 20, 5
_gen = torch.Generator().manual_seed(0)
BATCHES = [(torch.randn(16, 4, generator=_gen, dtype=D), torch.randn(16, 3, generator=_gen, dtype=D))
           for _ in range(STEPS)]


def two_layer(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


class OneTensor(torch.nn.Module):
    """The same two-layer network with both weight matrices in one parameter tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(0.5 * torch.randn(4 * 8 + 8 * 3, dtype=D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w[:32].view(8, 4).T) @ self.w[32:].view(3, 8).T


def loss_at(model: torch.nn.Module, t: int) -> torch.Tensor:
    x, y = BATCHES[t]
    return ((model(x) - y) ** 2).sum()


def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, STEPS, WARMUP))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, peer: bool = False) -> torch.nn.Module:
    """20 steps with the schedule. ``peer``: pytorch_optimizer's convention (gradients at θ before ``step``, a
    closure that clears them itself)."""
    sched = schedule(opt)
    for t in range(STEPS):
        if peer:
            opt.zero_grad()
            loss_at(model, t).backward()

            def closure(t=t):
                opt.zero_grad()
                loss = loss_at(model, t)
                loss.backward()
                return loss

            opt.step(closure)
        else:
            def closure(t=t):
                opt.zero_grad()  # Lion's step(closure) leaves the clearing to it, as torch's optimizers do
                loss = loss_at(model, t)
                loss.backward()
                return loss

            opt.step(closure)
        sched.step()
    return model


def rel_error(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """The largest ‖a − b‖/‖b‖ over the parameter tensors."""
    with torch.no_grad():
        return max(float((p - q).norm() / q.norm()) for p, q in zip(a.parameters(), b.parameters()))


def moved(model: torch.nn.Module, start: torch.nn.Module) -> float:
    return rel_error(model, start)


@pytest.fixture
def float64_norms(monkeypatch):
    """pytorch_optimizer's squared global gradient norm without its float32 cast."""
    def squared_norm(param_groups, device=None, *, weight_adaptive=False):
        grads = [p.grad for g in param_groups for p in g["params"] if p.grad is not None]
        return torch.stack([torch.linalg.vector_norm(g) for g in grads]).square().sum().reshape(1)

    monkeypatch.setattr(po_sam, "get_global_gradient_norm", squared_norm)


# -- independent transcriptions of the papers (flat vectors, the base optimizer is torch's SGD) -------------

def _flat_grad(model: torch.nn.Module, t: int) -> torch.Tensor:
    model.zero_grad()
    loss_at(model, t).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _set_flat(model: torch.nn.Module, vector: torch.Tensor) -> None:
    torch.nn.utils.vector_to_parameters(vector, model.parameters())


def transcribed(model: torch.nn.Module, direction) -> torch.nn.Module:
    """SGD (momentum 0.9, lr 0.01, the schedule) stepping with ``direction(t, θ, g_at) → gradient``."""
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = schedule(base)
    for t in range(STEPS):
        theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()

        def g_at(point: torch.Tensor, t=t) -> torch.Tensor:
            with torch.no_grad():
                _set_flat(model, point)
            return _flat_grad(model, t)

        step_with = direction(t, theta, g_at, base.param_groups[0]["lr"])
        with torch.no_grad():
            _set_flat(model, theta)
        torch.nn.utils.vector_to_parameters(step_with, [p.grad for p in model.parameters()])
        base.step()
        sched.step()
    return model


def _sgd(cls, model, **kw):
    return cls(model.parameters(), torch.optim.SGD, lr=0.01, momentum=0.9, **kw)


# -- GSAM ------------------------------------------------------------------------------------------------

def test_gsam_equals_pytorch_optimizers_gsam_with_its_proportion_scheduler(float64_norms):
    model = two_layer()
    ours = train(model, _sgd(GSAM, model, rho=0.1, rho_min=0.02, alpha=0.3))
    peer = two_layer()
    base = torch.optim.SGD(peer.parameters(), lr=0.01, momentum=0.9)
    sched = schedule(base)
    rho = po.ProportionScheduler(sched, max_lr=0.01, min_lr=0.0, max_value=0.1, min_value=0.02)
    opt = po.GSAM(peer.parameters(), base, peer, rho, alpha=0.3)
    for t in range(STEPS):
        def closure(t=t):
            base.zero_grad()
            with torch.enable_grad():
                loss = loss_at(peer, t)
                loss.backward()
            return None, loss.detach()

        opt.step(closure)
        sched.step()
        opt.update_rho_t()
    assert rel_error(ours, peer) <= 1e-8
    assert moved(ours, two_layer()) > 1e-2


def test_gsam_equals_the_papers_update_with_rho_following_the_lr():
    model = two_layer()
    ours = train(model, _sgd(GSAM, model, rho=0.1, rho_min=0.02, alpha=0.3))

    def gsam(t, theta, g_at, lr):
        rho_t = 0.02 + (0.1 - 0.02) * lr / 0.01
        g = g_at(theta)
        g_p = g_at(theta + rho_t * g / g.norm())
        perpendicular = g - (g @ g_p) / (g_p @ g_p) * g_p
        return g_p - 0.3 * perpendicular

    assert rel_error(ours, transcribed(two_layer(), gsam)) <= 1e-10


# -- Lion ------------------------------------------------------------------------------------------------

def test_lion_equals_pytorch_optimizers_lion_alone_and_as_the_base_of_sam(float64_norms):
    model = two_layer()
    ours = train(model, Lion(model.parameters(), lr=0.01, weight_decay=0.1))
    peer = two_layer()
    assert rel_error(ours, train(peer, po.Lion(peer.parameters(), lr=0.01, weight_decay=0.1))) <= 1e-8
    assert moved(ours, two_layer()) > 1e-2
    model = two_layer()
    ours = train(model, create_optimizer("sam", model.parameters(), lr=0.01, rho=0.1, weight_decay=0.1,
                                         base="lion"))
    peer = two_layer()
    assert rel_error(ours, train(peer, SAM(peer.parameters(), po.Lion, rho=0.1, lr=0.01, weight_decay=0.1))) <= 1e-8


def test_lion_is_the_papers_sign_update_with_decoupled_decay():
    model = two_layer()
    ours = train(model, Lion(model.parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=0.1))
    ref = two_layer()
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    for t in range(STEPS):
        lr = 0.01 * lr_factor(t, STEPS, WARMUP)
        ref.zero_grad()
        loss_at(ref, t).backward()
        with torch.no_grad():
            for p, m_i in zip(params, m):
                update = torch.sign(0.9 * m_i + 0.1 * p.grad)
                p.mul_(1 - lr * 0.1).sub_(lr * update)
                m_i.mul_(0.99).add_(0.01 * p.grad)
    assert rel_error(ours, ref) <= 1e-12


# -- Friendly SAM ----------------------------------------------------------------------------------------

class CodeConventionFriendlySAM(FriendlySAM):
    """Ours with the authors' code's order (as pytorch_optimizer): d from the previous m, m starting at g."""

    def _perturbation(self, params, grads, groups, grad_norm):
        if not self._momentum:
            self._momentum = {p: g.clone() for p, g in zip(params, grads)}
            d = grads
        else:
            ms = [self._momentum[p] for p in params]
            d = torch._foreach_add(grads, ms, alpha=-self.sigma)
            torch._foreach_mul_(ms, self.lmbda)
            torch._foreach_add_(ms, grads, alpha=1.0 - self.lmbda)
        nd = norm_of(d).item()
        return torch._foreach_mul(d, [g["rho"] / nd for g in groups]), nd


def _friendly_transcription(code_convention: bool):
    m = {}

    def friendly(t, theta, g_at, lr):
        g = g_at(theta)
        if code_convention:
            d = g if not m else g - 1.0 * m["m"]
            m["m"] = g.clone() if not m else 0.8 * m["m"] + 0.2 * g
        else:
            m["m"] = 0.8 * m.get("m", torch.zeros_like(g)) + 0.2 * g
            d = g - 1.0 * m["m"]
        return g_at(theta + 0.1 * d / d.norm())

    return friendly


def test_friendly_sam_follows_the_paper_and_differs_from_pytorch_optimizer_only_in_the_order_of_m(float64_norms):
    model = two_layer()
    ours = train(model, _sgd(FriendlySAM, model, rho=0.1, sigma=1.0, lmbda=0.8))
    assert rel_error(ours, transcribed(two_layer(), _friendly_transcription(False))) <= 1e-10  # the paper

    peer = two_layer()
    peer = train(peer, _sgd(po.FriendlySAM, peer, rho=0.1, sigma=1.0, lmbda=0.8), peer=True)
    code = two_layer()
    code = train(code, _sgd(CodeConventionFriendlySAM, code, rho=0.1, sigma=1.0, lmbda=0.8))
    assert rel_error(code, peer) <= 1e-8  # the rest of the method is the same
    assert rel_error(code, transcribed(two_layer(), _friendly_transcription(True))) <= 1e-10
    assert rel_error(ours, peer) > 1e-3  # the difference: d from the updated m, m₀ = 0


# -- LookSAM ---------------------------------------------------------------------------------------------

def _looksam_transcription(k: int, alpha: float, per_tensor: list[slice] | None):
    """The paper's LookSAM; ``per_tensor``: pytorch_optimizer's reading, norms and projection per tensor."""
    kept = {}

    def parts(v):
        return [v] if per_tensor is None else [v[s] for s in per_tensor]

    def looksam(t, theta, g_at, lr):
        g = g_at(theta)
        if t % k == 0:
            g_s = g_at(theta + 0.1 * g / g.norm())
            kept["g_v"] = torch.cat([s - (s @ f) / (f @ f) * f for s, f in zip(parts(g_s), parts(g))])
            return g_s
        eps = 0.0 if per_tensor is None else 1e-8  # pytorch_optimizer adds 1e-8 to ‖g_v‖
        return torch.cat([f + alpha * f.norm() / (v.norm() + eps) * v for f, v in zip(parts(g), parts(kept["g_v"]))])

    return looksam


def _slices(model: torch.nn.Module) -> list[slice]:
    out, start = [], 0
    for p in model.parameters():
        out.append(slice(start, start + p.numel()))
        start += p.numel()
    return out


def test_looksam_follows_the_paper_with_one_pass_between_full_steps():
    model = two_layer()
    calls = []
    opt = _sgd(LookSAM, model, rho=0.1, k=3, alpha=0.5)
    sched = schedule(opt)
    for t in range(STEPS):
        def closure(t=t):
            calls.append(t)
            loss_at(model, t).backward()
        opt.step(closure)
        sched.step()
    assert len(calls) == STEPS + math.ceil(STEPS / 3)  # a second pass on steps 0, 3, 6, ... only
    assert rel_error(model, transcribed(two_layer(), _looksam_transcription(3, 0.5, None))) <= 1e-10
    assert moved(model, two_layer()) > 1e-2


def test_looksam_equals_pytorch_optimizer_where_per_tensor_and_global_norms_agree(float64_norms):
    model = OneTensor()
    ours = train(model, _sgd(LookSAM, model, rho=0.1, k=3, alpha=0.5))
    peer = OneTensor()
    peer = train(peer, _sgd(po.LookSAM, peer, rho=0.1, k=3, alpha=0.5), peer=True)
    assert rel_error(ours, peer) <= 1e-8
    # With several tensors pytorch_optimizer's per-tensor reading is another method: it equals its transcription,
    # and ours the paper's.
    model = two_layer()
    ours = train(model, _sgd(LookSAM, model, rho=0.1, k=3, alpha=0.5))
    peer = two_layer()
    peer = train(peer, _sgd(po.LookSAM, peer, rho=0.1, k=3, alpha=0.5), peer=True)
    per_tensor = transcribed(two_layer(), _looksam_transcription(3, 0.5, _slices(two_layer())))
    assert rel_error(peer, per_tensor) <= 1e-8
    assert rel_error(ours, peer) > 1e-3


# -- identities: each new method at its degenerate setting is SAM, bit for bit -------------------------------

@pytest.mark.parametrize("base, kw", [(torch.optim.SGD, dict(momentum=0.9)), (torch.optim.AdamW, {}), (Lion, {})],
                         ids=["sgd", "adamw", "lion"])
@pytest.mark.parametrize("cls, knobs", [(GSAM, dict(alpha=0.0, rho_min=0.1)), (FriendlySAM, dict(sigma=0.0)),
                                        (LookSAM, dict(k=1))], ids=["gsam-alpha0-constant-rho", "friendly-sigma0",
                                                                    "looksam-k1"])
def test_degenerate_settings_are_sam_bit_for_bit(cls, knobs, base, kw):
    a, b = two_layer(), two_layer()
    train(a, SAM(a.parameters(), base, rho=0.1, lr=0.01, **kw))
    train(b, cls(b.parameters(), base, rho=0.1, lr=0.01, **knobs, **kw))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert moved(a, two_layer()) > 1e-3


@pytest.mark.parametrize("name, knobs", [("gsam", dict(alpha=0.3, rho_min=0.02)),
                                         ("friendly_sam", dict(sigma=1.0, lmbda=0.8)),
                                         ("looksam", dict(k=2, alpha=0.5)), ("lion", {})])
def test_state_dict_round_trip_of_the_new_methods_is_bit_identical(name, knobs):
    def build(model):
        extra = dict(rho=0.1, base="adamw", **knobs) if name != "lion" else {}
        return create_optimizer(name, model.parameters(), lr=0.01, weight_decay=0.01, **extra)

    def steps(model, opt, sched, ts):
        for t in ts:
            if name == "lion":
                opt.zero_grad()
                loss_at(model, t).backward()
                opt.step()
            else:
                opt.step(lambda t=t: loss_at(model, t).backward())
            sched.step()

    m1 = two_layer()
    o1 = build(m1)
    s1 = schedule(o1)
    steps(m1, o1, s1, range(5))
    saved = copy.deepcopy((m1.state_dict(), o1.state_dict(), s1.state_dict()))
    m2 = two_layer(seed=9)
    o2 = build(m2)
    s2 = schedule(o2)
    m2.load_state_dict(saved[0])
    o2.load_state_dict(saved[1])
    s2.load_state_dict(saved[2])
    steps(m1, o1, s1, range(5, STEPS))
    steps(m2, o2, s2, range(5, STEPS))
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    if name in ("friendly_sam", "looksam"):  # without the method's own state the continuation differs
        m3 = two_layer(seed=9)
        o3 = build(m3)
        s3 = schedule(o3)
        m3.load_state_dict(saved[0])
        o3.load_state_dict({k: v for k, v in copy.deepcopy(saved[1]).items() if k != "sam"})
        s3.load_state_dict(saved[2])
        steps(m3, o3, s3, range(5, STEPS))
        assert not all(torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))


def _peer_default(cls: type, name: str) -> float:
    return inspect.signature(cls.__init__).parameters[name].default


def test_gsam_and_friendly_sam_defaults_are_the_papers_and_the_peers():
    """A registry default drifting from the published setting would put a study's GSAM or Friendly SAM at a point
    neither paper ran. GSAM (Zhuang et al. 2022, Table 4, the authors' repository): with an AdamW base the paper
    runs α 0.4 with ρ_min 0 (ViT-S/32; ρ_max 0.6 there, which the grid's ρ axis replaces), and pytorch_optimizer's
    GSAM defaults α to 0.4. Friendly SAM (Li et al. 2024): σ = 1 in every experiment, λ 0.9 in the authors'
    FriendlySAM class and pytorch_optimizer's (their CIFAR runs set 0.6 or 0.95 on the command line)."""
    gsam, friendly = default_hparams("gsam"), default_hparams("friendly_sam")
    assert (gsam["alpha"], gsam["rho_min"]) == (0.4, 0.0)
    assert gsam["alpha"] == _peer_default(po_sam.GSAM, "alpha")
    assert (friendly["sigma"], friendly["lmbda"]) == (1.0, 0.9)
    assert (friendly["sigma"], friendly["lmbda"]) == (_peer_default(po_sam.FriendlySAM, "sigma"),
                                                      _peer_default(po_sam.FriendlySAM, "lmbda"))
    assert GSAM([torch.zeros(1, requires_grad=True)], lr=0.1).alpha == gsam["alpha"]  # the class agrees
    sam = FriendlySAM([torch.zeros(1, requires_grad=True)], lr=0.1)
    assert (sam.sigma, sam.lmbda) == (friendly["sigma"], friendly["lmbda"])
