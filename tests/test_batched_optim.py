"""align.optim.batched against the reference optimizers, slice by slice: torch.optim's SGD / Adam / AdamW and the SAM
family of align.optim.sam driven by align.optim.step.take_step, each head on its own, in float64."""
from __future__ import annotations

import math

import pytest
import torch

from align.optim import create_optimizer
from align.optim.batched import (METHODS, HeadHparams, ParamSpec, base_step_, clip_grads_, descent_, global_norm,
                                 head_hparams, init_method_state, init_state, perturbation)
from align.optim.step import take_step
from align.train.run_data import lr_factor

D = torch.float64
SPECS = {"w": ParamSpec(decay=True, perturb=True), "b": ParamSpec(decay=False, perturb=True),
         "s": ParamSpec(decay=False, perturb=False)}
SHAPES = {"w": (3, 4), "b": (3,), "s": ()}


def _initial(k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(k, *shape, generator=gen, dtype=D) for n, shape in SHAPES.items()}


def _reference_params(stacked: dict[str, torch.Tensor], k: int) -> dict[str, torch.nn.Parameter]:
    return {n: torch.nn.Parameter(t[k].clone()) for n, t in stacked.items()}


def _groups(p: dict[str, torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """The param groups AlignmentModel.param_groups makes: decayed weights, undecayed bias, unperturbed scale."""
    return [{"params": [p["w"]], "weight_decay": weight_decay, "perturb": True},
            {"params": [p["b"]], "weight_decay": 0.0, "perturb": True},
            {"params": [p["s"]], "weight_decay": 0.0, "perturb": False}]


def _close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    err = float((got - want).abs().max()) if got.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    assert err <= rel * max(scale, 1e-300), f"{what}: max error {err:.3g} against scale {scale:.3g}"


# -- base optimizers ------------------------------------------------------------------------------------

BASE_HEADS = [
    dict(name="sgd", lr=0.3, momentum=0.9, weight_decay=0.1),
    dict(name="sgd", lr=0.2, momentum=0.0, weight_decay=0.0),
    dict(name="adam", lr=0.05, weight_decay=0.05),
    dict(name="adamw", lr=0.02, weight_decay=0.1),
    dict(name="adamw", lr=0.01, weight_decay=0.0, betas=(0.8, 0.99), eps=1e-6),
]


def test_batched_sgd_adam_adamw_equal_torch_optim_slice_by_slice_with_the_schedule():
    steps, warmup, k = 12, 4, len(BASE_HEADS)
    stacked = _initial(k)
    hp = HeadHparams.stack([head_hparams(**h) for h in BASE_HEADS])
    params = {n: t.clone() for n, t in stacked.items()}
    state = init_state(params, hp)
    refs = []
    for i, h in enumerate(BASE_HEADS):
        p = _reference_params(stacked, i)
        kwargs = {key: v for key, v in h.items() if key not in ("name", "lr", "weight_decay")}
        opt = create_optimizer(h["name"], _groups(p, h["weight_decay"]), lr=h["lr"], **kwargs)
        refs.append((p, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, steps, warmup))))
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        grads = {n: torch.randn(k, *SHAPES[n], generator=gen, dtype=D) for n in SHAPES}
        for i, (p, opt, sched) in enumerate(refs):
            for n in SHAPES:
                p[n].grad = grads[n][i].clone()
            opt.step()
            sched.step()
        base_step_(params, grads, state, SPECS, hp, [lr * lr_factor(step, steps, warmup) for lr in hp.host["lr"]])
        for i, (p, opt, _) in enumerate(refs):
            for j, n in enumerate(SHAPES):
                _close(params[n][i], p[n].detach(), 1e-12, f"head {i} {n} step {step}")
                for key, value in opt.state[p[n]].items():
                    if torch.is_tensor(value):
                        _close(state[n][key][i], value, 1e-12, f"head {i} {n} {key}")
    assert float(refs[0][0]["w"].detach().sub(stacked["w"][0]).abs().max()) > 0.1  # the heads really moved


def test_inactive_heads_keep_weights_and_state_bit_for_bit():
    k = len(BASE_HEADS)
    hp = HeadHparams.stack([head_hparams(**h) for h in BASE_HEADS])
    params = _initial(k)
    state = init_state(params, hp)
    grads = {n: torch.ones_like(t) for n, t in params.items()}
    base_step_(params, grads, state, SPECS, hp, hp.host["lr"])
    before = {n: t.clone() for n, t in params.items()}
    saved = {n: {key: v.clone() for key, v in st.items()} for n, st in state.items()}
    active = [True, False, True, False, True]
    base_step_(params, grads, state, SPECS, hp, hp.host["lr"], active=active)
    for n in params:
        for i in range(k):
            assert torch.equal(params[n][i], before[n][i]) != bool(active[i]), (n, i)
            for key in state[n]:
                if not active[i]:
                    assert torch.equal(state[n][key][i], saved[n][key][i])


# -- the SAM family's first step ------------------------------------------------------------------------

FIRST_STEP_HEADS = [
    (dict(name="sam", rho=0.1), 1.0),
    (dict(name="sam", rho=0.1, norm_scope="all_trainable"), 1.0),
    (dict(name="msam", rho=0.3), 1.0),
    (dict(name="msam", rho=0.3, alpha=0.5, norm_scope="all_trainable"), 3.0),
    (dict(name="msam", rho=0.2, metric_beta=0.9, norm_scope="all_trainable"), 1.0),
    (dict(name="asam", rho=0.5, eta=0.01), 1.0),
    (dict(name="fsam", rho=0.05, eta=1.0), 2.0),
    (dict(name="sam", rho=0.0), 1.0),  # ρ = 0: never perturbed, never "skipped"
    (dict(name="sam", rho=0.1), 0.0),  # zero gradient: the guard skips the perturbation
    (dict(name="msam", rho=0.1), math.inf),  # non-finite gradient: skipped too
    (dict(name="adamw"), 1.0),  # a single-pass head in the same pack is left alone
    (dict(name="gsam", rho=0.2, rho_min=0.1, alpha=0.3, norm_scope="all_trainable"), 2.0),
    (dict(name="friendly_sam", rho=0.2, sigma=0.5, lmbda=0.6), 1.0),
    (dict(name="looksam", rho=0.2, k=4), 1.0),
]


def test_first_step_equals_the_sam_classes_for_every_rule_and_guard():
    k = len(FIRST_STEP_HEADS)
    stacked = _initial(k, seed=2)
    gen = torch.Generator().manual_seed(3)
    grads = {n: torch.randn(k, *SHAPES[n], generator=gen, dtype=D) for n in SHAPES}
    for i, (_, gscale) in enumerate(FIRST_STEP_HEADS):
        for n in SHAPES:
            grads[n][i] *= gscale if gscale != math.inf else 1.0
        if gscale == math.inf:
            grads["w"][i, 0, 0] = math.inf
    hp = HeadHparams.stack([head_hparams(lr=0.1, **h) for h, _ in FIRST_STEP_HEADS])
    out = perturbation(stacked, grads, SPECS, hp, init_method_state(stacked, SPECS, hp))
    for i, (h, _) in enumerate(FIRST_STEP_HEADS):
        p = _reference_params(stacked, i)
        opt = create_optimizer(h["name"], _groups(p, 0.0), lr=0.1, **{a: v for a, v in h.items() if a != "name"})
        for n in SHAPES:
            p[n].grad = grads[n][i].clone()
        if h["name"] == "adamw":
            for n in SHAPES:
                assert torch.equal(out.perturbed[n][i], stacked[n][i])
            assert not out.applied[i] and not out.skipped[i]
            continue
        opt.first_step()
        for n in SHAPES:
            _close(out.perturbed[n][i] - stacked[n][i], p[n].detach() - stacked[n][i], 1e-12, f"δ {h} {n}")
        stats = opt.last_stats
        assert bool(out.skipped[i]) == stats["skipped"] == (opt.skipped_steps == 1), h
        assert bool(out.applied[i]) == (stats["perturbation_norm"] > 0), h
        if math.isfinite(stats["grad_norm"]):
            assert float(out.grad_norm[i]) == pytest.approx(stats["grad_norm"], rel=1e-12)
        assert float(out.delta_norm[i]) == pytest.approx(stats["perturbation_norm"], rel=1e-12, abs=1e-300)
    assert int(out.applied.sum()) == 10 and int(out.skipped.sum()) == 2


# -- whole steps: first step, second gradient, clipping, base step --------------------------------------

STEP_HEADS = [
    dict(name="sam", lr=0.05, rho=0.2, base="sgd", momentum=0.9, weight_decay=1e-3),
    dict(name="msam", lr=0.02, rho=0.5, metric_beta=0.8, grad_clip=0.7),
    dict(name="msam", lr=0.02, rho=0.3, alpha=2.0, norm_scope="all_trainable", base="adam"),
    dict(name="asam", lr=0.01, rho=1.0, eta=0.1, weight_decay=0.1),
    dict(name="fsam", lr=0.03, rho=0.1, eta=0.5, grad_clip=0.5),
    dict(name="adamw", lr=0.03, weight_decay=0.1, grad_clip=0.3),
    dict(name="sgd", lr=0.1, momentum=0.5),
    # issue 24: GSAM (ρ_t follows the lr), Friendly SAM, LookSAM (a second pass every k-th step), Lion
    dict(name="gsam", lr=0.05, rho=0.3, rho_min=0.05, alpha=0.4, base="sgd", momentum=0.9, grad_clip=0.9),
    dict(name="gsam", lr=0.02, rho=0.2, alpha=0.2, norm_scope="all_trainable", weight_decay=0.1),
    dict(name="friendly_sam", lr=0.02, rho=0.3, sigma=1.0, lmbda=0.7),
    dict(name="friendly_sam", lr=0.01, rho=0.2, sigma=0.5, lmbda=0.9, base="lion", weight_decay=0.1),
    dict(name="looksam", lr=0.02, rho=0.3, k=3, alpha=0.6),
    dict(name="looksam", lr=0.05, rho=0.2, k=2, alpha=0.3, base="sgd", momentum=0.9),
    dict(name="lion", lr=0.01, weight_decay=0.1, grad_clip=0.5),
    dict(name="sam", lr=0.01, rho=0.2, base="lion", betas=(0.8, 0.95)),
]
TWO_PASS = ("sam", "msam", "asam", "fsam", "gsam", "friendly_sam", "looksam")


def _loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A small smooth loss that every parameter reaches: ½ ‖eˢ tanh(W x + b) − y‖²."""
    return 0.5 * ((torch.exp(p["s"]) * torch.tanh(p["w"] @ x + p["b"]) - y) ** 2).sum()


def _grads(params: dict[str, torch.Tensor], data: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each head's gradient of its own loss, head by head with plain autograd."""
    out = {n: torch.zeros_like(t) for n, t in params.items()}
    for i, (x, y) in enumerate(data):
        leaf = {n: t[i].detach().clone().requires_grad_() for n, t in params.items()}
        for n, g in zip(leaf, torch.autograd.grad(_loss(leaf, x, y), list(leaf.values()))):
            out[n][i] = g
    return out


def test_whole_steps_equal_take_step_with_the_reference_optimizers():
    steps, warmup, k = 15, 3, len(STEP_HEADS)
    stacked = _initial(k, seed=4)
    gen = torch.Generator().manual_seed(5)
    data = [(torch.randn(4, generator=gen, dtype=D), torch.randn(3, generator=gen, dtype=D)) for _ in range(k)]
    hp = HeadHparams.stack([head_hparams(**h) for h in STEP_HEADS])
    params = {n: t.clone() for n, t in stacked.items()}
    state, methods = init_state(params, hp), init_method_state(params, SPECS, hp)
    refs = []
    for i, h in enumerate(STEP_HEADS):
        p = _reference_params(stacked, i)
        kwargs = {a: v for a, v in h.items() if a not in ("name", "lr", "weight_decay", "grad_clip")}
        if h["name"] in TWO_PASS:
            kwargs["max_grad_norm"] = h.get("grad_clip")
        opt = create_optimizer(h["name"], _groups(p, h.get("weight_decay", 0.0)), lr=h["lr"], **kwargs)
        refs.append((p, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, steps, warmup))))
    for step in range(steps):
        for i, (p, opt, sched) in enumerate(refs):
            def closure(p=p, x=data[i][0], y=data[i][1]):
                loss = _loss(p, x, y)
                loss.backward()
                return loss.detach()
            single_clip = STEP_HEADS[i].get("grad_clip") if STEP_HEADS[i]["name"] not in TWO_PASS else None
            take_step(opt, closure, single_clip)
            sched.step()
        g = _grads(params, data)
        lr = [lr * lr_factor(step, steps, warmup) for lr in hp.host["lr"]]
        pert = perturbation(params, g, SPECS, hp, methods, lr=lr)
        g2 = _grads(pert.perturbed, data)
        chosen = {n: torch.where(pert.second.reshape((-1,) + (1,) * (t.ndim - 1)), g2[n], t) for n, t in g.items()}
        descent_(g, chosen, SPECS, hp, methods, pert, torch.ones(k, dtype=torch.bool))
        clip_grads_(chosen, hp.grad_clip)
        base_step_(params, chosen, state, SPECS, hp, lr)
        for i, (p, opt, _) in enumerate(refs):
            for n in SHAPES:
                _close(params[n][i], p[n].detach(), 1e-10, f"{STEP_HEADS[i]} {n} step {step}")
    for i, (p, opt, _) in enumerate(refs):
        if STEP_HEADS[i].get("metric_beta"):  # M-SAM's averaged metric m agrees as well
            for j, n in enumerate(SHAPES):
                ema = opt.state_dict()["sam"].get("metric_ema", {})
                if j in ema:
                    _close(methods[METHODS.index("msam")].tensors[n][i], ema[j], 1e-10, f"metric {n}")


def test_per_head_global_norm_and_clipping_are_torch_clip_grad_norm():
    gen = torch.Generator().manual_seed(6)
    grads = {n: torch.randn(4, *SHAPES[n], generator=gen, dtype=D) * 3 for n in SHAPES}
    norms = global_norm(list(grads.values()))
    for i in range(4):
        want = math.sqrt(sum(float((g[i] ** 2).sum()) for g in grads.values()))
        assert float(norms[i]) == pytest.approx(want, rel=1e-13)
    max_norm = torch.tensor([1.0, math.inf, 1e9, 0.5], dtype=D)
    clipped = {n: g.clone() for n, g in grads.items()}
    clip_grads_(clipped, max_norm)
    for i in range(4):
        ref = [torch.nn.Parameter(torch.zeros_like(g[i])) for g in grads.values()]
        for r, g in zip(ref, grads.values()):
            r.grad = g[i].clone()
        if math.isfinite(max_norm[i]):
            torch.nn.utils.clip_grad_norm_(ref, float(max_norm[i]))
        for r, n in zip(ref, grads):
            _close(clipped[n][i], r.grad, 1e-15, f"clip head {i} {n}")
