"""The paper's signal-quality measure ρ(S) per neuron, averaged per layer (SPEC §2, paper Sec. 5).

For neuron k of an affine layer (input x, output y_k = w_kᵀx without bias):

    ρ(S) = 1 − corr(y_k, vᵀ(x − S(x)))

where v is the least-squares regression (with intercept, a tiny ridge) of y_k on
the distractor x − S(x), fitted on one split and the correlation evaluated on
another. Every estimator here has the form S(x) = y_k·s⁺_k when the neuron's
gate y_k + b_k > 0 is open and y_k·s⁻_k otherwise (the gate of SPEC §2, the
same one the estimator used to split the regimes):

* ``random``: s⁺ = s⁻ = u/(wᵀu), u a random Gaussian direction per neuron,
* ``S_w``: s⁺ = s⁻ = w/(wᵀw)                      (gradient / DeConvNet / Guided BackProp),
* ``S_a``: s⁺ = s⁻ = a_lin                        (linear pattern, eq. 4),
* ``S_a±``: s⁺ = a⁺, s⁻ = a⁻                      (two-component pattern, eq. 8).

Because the distractor is ``x − z⁺s⁺ − z⁻s⁻`` with ``z⁺ = g·y``, ``z⁻ = (1−g)·y``,
its covariance is the covariance of x plus a rank-≤4 correction, so one D×D
matrix per layer and two D-vectors per neuron give every regression (no N×D
distractor matrix per neuron). Everything is float64.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional

import torch
from tqdm.auto import tqdm

from .._progress import bars_off
from ..store import SignalStore, model_fingerprint
from ..layers import AffineLayer, Linear
from ..trace import Program

ESTIMATORS = ("random", "S_w", "S_a", "S_a±")
#: Ridge added to the distractor covariance, relative to its mean diagonal (the
#: covariance is always singular: the distractor of a rank-one estimator is ⊥ w).
RIDGE = 1e-6


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den[:, None]`` with rows of zero denominator set to 0 (dead neurons)."""
    ok = den != 0
    return torch.where(ok.unsqueeze(1), num / torch.where(ok, den, torch.ones_like(den)).unsqueeze(1),
                       torch.zeros_like(num))


def signal_directions(layer: AffineLayer, patterns: Mapping[str, torch.Tensor], estimator: str,
                      generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s⁺, s⁻)`` (K, D) float64 such that S(x)_k = y_k·s⁺_k (gate open) or y_k·s⁻_k (gate closed)."""
    k = layer.out_features
    w = layer.weight.detach().double().reshape(k, -1).cpu()
    if estimator == "random":
        u = torch.randn(w.shape, generator=generator, dtype=torch.float64)
        s = _safe_divide(u, (w * u).sum(1))
        return s, s
    if estimator == "S_w":
        s = _safe_divide(w, (w * w).sum(1))
        return s, s
    if estimator == "S_a":
        s = patterns["a_lin"].double().reshape(k, -1).cpu()
        return s, s
    if estimator == "S_a±":
        return patterns["a_pos"].double().reshape(k, -1).cpu(), patterns["a_neg"].double().reshape(k, -1).cpu()
    raise ValueError(f"unknown estimator {estimator!r}; use one of {ESTIMATORS}")


def _regimes(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = x wᵀ`` (no bias) and its split ``z⁺ = g·y``, ``z⁻ = (1−g)·y`` by the gate ``y + b > 0``."""
    y = x @ w.T
    gate = (y + b) > 0
    zero = torch.zeros_like(y)
    return y, torch.where(gate, y, zero), torch.where(gate, zero, y)


def _centred(t: torch.Tensor) -> torch.Tensor:
    return t - t.mean(0, keepdim=True)


def _fit_regressions(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, s_pos: torch.Tensor,
                     s_neg: torch.Tensor, ridge: float) -> torch.Tensor:
    """Least-squares v (K, D) of y_k on the distractor x − z⁺s⁺ − z⁻s⁻, per neuron, from one split."""
    n = x.shape[0]
    y, zp, zn = _regimes(x, w, b)
    xc, zp, zn = _centred(x), _centred(zp), _centred(zn)
    cxx = xc.T @ xc / n  # (D, D)
    lxz = torch.stack([xc.T @ zp, xc.T @ zn], dim=2).permute(1, 0, 2) / n  # (K, D, 2): cov(x, z±)
    vzz = torch.stack([torch.stack([(zp * zp).mean(0), (zp * zn).mean(0)], 1),
                       torch.stack([(zn * zp).mean(0), (zn * zn).mean(0)], 1)], 1)  # (K, 2, 2)
    s = torch.stack([s_pos, s_neg], dim=2)  # (K, D, 2)
    ls = lxz @ s.transpose(1, 2)
    cov_d = cxx.unsqueeze(0) - ls - ls.transpose(1, 2) + s @ vzz @ s.transpose(1, 2)  # (K, D, D)
    cov_dy = lxz.sum(2) - (s @ vzz.sum(2, keepdim=True)).squeeze(2)  # cov(d, y) with y = z⁺ + z⁻
    d = cov_d.shape[1]
    scale = cov_d.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-300)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    system = cov_d + (ridge * scale).view(-1, 1, 1) * eye
    chol, info = torch.linalg.cholesky_ex(system)
    if bool((info == 0).all()):
        return torch.cholesky_solve(cov_dy.unsqueeze(2), chol).squeeze(2)
    return torch.linalg.lstsq(system, cov_dy.unsqueeze(2)).solution.squeeze(2)  # ridge=0 and singular


def _correlations(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, s_pos: torch.Tensor,
                  s_neg: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """corr(y_k, v_kᵀ d_k) on a split (NaN where y_k is constant, 0 where the prediction is)."""
    y, zp, zn = _regimes(x, w, b)
    pred = x @ v.T - zp * (v * s_pos).sum(1) - zn * (v * s_neg).sum(1)
    y, pred = _centred(y), _centred(pred)
    sy, sp = y.norm(dim=0), pred.norm(dim=0)
    num = (y * pred).sum(0)
    corr = torch.where(sp > 1e-12 * sy, num / (sy * sp).clamp(min=1e-300), torch.zeros_like(num))
    return torch.where(sy > 0, corr, torch.full_like(corr, math.nan))


def neuron_rho(x_fit: torch.Tensor, x_eval: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               s_pos: torch.Tensor, s_neg: torch.Tensor, ridge: float = RIDGE, chunk: int = 16) -> torch.Tensor:
    """ρ per neuron (K,): v fitted on ``x_fit`` (N, D), correlation on ``x_eval``; NaN for constant outputs.

    ``weight`` (K, D), ``bias`` (K,) and the directions (K, D) select the neurons;
    ``chunk`` neurons are solved at once (each needs a D×D system).
    """
    x_fit, x_eval = x_fit.double(), x_eval.double()
    w, b = weight.double().reshape(weight.shape[0], -1), bias.double()
    out = []
    for i in range(0, w.shape[0], chunk):
        sl = slice(i, i + chunk)
        v = _fit_regressions(x_fit, w[sl], b[sl], s_pos[sl], s_neg[sl], ridge)
        out.append(1.0 - _correlations(x_eval, w[sl], b[sl], s_pos[sl], s_neg[sl], v))
    return torch.cat(out)


def layer_inputs(program: Program, images: torch.Tensor, positions: int, generator: torch.Generator,
                 batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Every affine layer's input as float64 rows (N, D); conv layers give ``positions`` random patches per image."""
    grouped = [layer.name for layer in program.layers if layer.groups != 1]
    if grouped:
        raise ValueError(f"ρ(S) supports convolutions with groups=1 only; {grouped} are grouped "
                         "(a grouped neuron sees part of the patch). Measure a model without grouped convolutions.")
    rows: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in program.layers}

    def capture(layer: AffineLayer, inp: torch.Tensor) -> torch.Tensor:
        rows[layer.name].append(_sample_rows(layer, inp, positions, generator))
        return layer.forward(inp)

    weight = program.layers[0].weight
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            program.forward(images[i:i + batch_size].to(weight.device, weight.dtype), affine=capture)
    return {name: torch.cat(r).double() for name, r in rows.items()}


def _sample_rows(layer: AffineLayer, inp: torch.Tensor, positions: int, generator: torch.Generator) -> torch.Tensor:
    """Linear: every input row. Conv: ``positions`` patches per image, drawn without replacement."""
    patches = layer.patches(inp.detach()).cpu()  # (B, L, D)
    if isinstance(layer, Linear):
        return patches.reshape(-1, patches.shape[-1])
    b, length, d = patches.shape
    take = min(positions, length)
    idx = torch.rand(b, length, generator=generator).argsort(1)[:, :take]
    return patches.gather(1, idx.unsqueeze(2).expand(b, take, d)).reshape(-1, d)


def signal_quality(
    model: torch.nn.Module,
    store: SignalStore,
    fit_images: torch.Tensor,
    eval_images: torch.Tensor,
    estimators: Iterable[str] = ESTIMATORS,
    max_neurons: int = 32,
    positions: int = 4,
    ridge: float = RIDGE,
    seed: int = 0,
    progress: bool = True,
    layers: Optional[Iterable[str]] = None,
    chunk: int = 16,
) -> dict[str, dict[str, dict[str, float]]]:
    """ρ(S) per layer and estimator: ``{layer: {estimator: {rho, std, neurons, skipped}}}``.

    ``store`` holds the patterns (fitted on a third split; an all-class store is
    what the paper measures); v is fitted on ``fit_images`` and ρ is evaluated
    on ``eval_images``. At most ``max_neurons`` random neurons per layer and
    ``positions`` random patches per image (conv) keep it fast. ``layers``: names of
    the layers to score (default: all; each neuron solves a D×D system, so wide
    layers cost D² memory per neuron of a ``chunk``). The model is never modified
    (only its traced copy is run).
    """
    estimators = list(estimators)
    for e in estimators:
        if e not in ESTIMATORS:
            raise ValueError(f"unknown estimator {e!r}; use some of {ESTIMATORS}")
    program = Program(model)
    store.check_matches(program, model_fingerprint(model), source="the signal store passed to signal_quality")
    gen = torch.Generator().manual_seed(seed)
    x_fit = layer_inputs(program, fit_images, positions, gen)
    x_eval = layer_inputs(program, eval_images, positions, gen)
    result: dict[str, dict[str, dict[str, float]]] = {}
    names = [layer.name for layer in program.layers]
    wanted = set(names if layers is None else layers)
    if wanted - set(names):
        raise ValueError(f"layers {sorted(wanted - set(names))} are not affine layers of the model; use some of {names}")
    scored = [layer for layer in program.layers if layer.name in wanted]
    bar = tqdm(total=len(scored) * len(estimators), desc="signal quality ρ(S)", disable=bars_off(progress))
    for layer in scored:
        keep = torch.randperm(layer.out_features, generator=gen)[:max_neurons].sort().values
        w = layer.weight.detach().double().cpu().reshape(layer.out_features, -1)[keep]
        b = layer.bias.detach().double().cpu()[keep]
        result[layer.name] = {}
        for est in estimators:
            s_pos, s_neg = signal_directions(layer, store.patterns[layer.name], est, gen)
            rho = neuron_rho(x_fit[layer.name], x_eval[layer.name], w, b, s_pos[keep], s_neg[keep], ridge, chunk)
            result[layer.name][est] = _summary(rho)
            bar.update(1)
    bar.close()
    return result


def _summary(rho: torch.Tensor) -> dict[str, float]:
    """Mean and spread over the neurons with a defined ρ (NaN ones are counted as skipped)."""
    ok = rho[~rho.isnan()]
    return {
        "rho": float(ok.mean()) if ok.numel() else math.nan,
        "std": float(ok.std()) if ok.numel() > 1 else 0.0,
        "neurons": int(ok.numel()),
        "skipped": int(rho.numel() - ok.numel()),
    }
