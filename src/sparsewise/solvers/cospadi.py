"""CoSpaDi: a weight as a dense dictionary times column-sparse codes, fitted on calibration data.

Shmalko et al. 2025, "COSPADI: Compressing LLMs via Calibration-Guided Sparse Dictionary
Learning". W [out, in] ~ D C with D [out, atoms] dense and C [atoms, in] holding ``nonzeros``
entries per column: input column j of W lives in its own span of a few atoms (a union of
subspaces) instead of one shared rank-r subspace. The fit minimises the layer's output error on
calibration inputs X, ||X W^T - X (D C)^T||_F^2 = tr(E H E^T) with E = W - D C and H = X^T X.

What is the paper's and what is ours (its code was not available; the abstract fixes the model
and the data-aware objective): the dictionary starts from the whitened SVD (left singular vectors
of W L, H = L L^T, as SVD-LLM does for low rank), so ``nonzeros == atoms`` gives exactly the
whitened truncated SVD; then alternating
  * supports by batched orthogonal matching pursuit on the columns of W (the support choice is
    per column, where H's coupling of columns cannot enter),
  * the code values on those supports by conjugate gradients on tr(E H E^T) (exact data-aware
    least squares restricted to the supports),
  * the dictionary in closed form, D = W H C^T (C H C^T)^-1,
keeping the best iterate by the data-aware error, so the result is never worse than its start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, NumericalError


@dataclass
class DictionaryFactors:
    dictionary: torch.Tensor  # D [out, atoms]
    codes: torch.Tensor  # C [atoms, in], ``nonzeros`` nonzeros per column (dense storage)
    support: torch.Tensor  # long [in, nonzeros]: atom indices of each column's codes
    error: float  # tr(E H E^T) / tr(W H W^T) on the damped H
    start_error: float  # the same for the whitened-SVD start
    iterations: int

    @property
    def atoms(self) -> int:
        return int(self.dictionary.shape[1])

    @property
    def nonzeros(self) -> int:
        return int(self.support.shape[1])

    def product(self) -> torch.Tensor:
        return self.dictionary @ self.codes


def dictionary_size(out_features: int, in_features: int, keep_ratio: float, code_density: float) -> tuple[int, int]:
    """(atoms, nonzeros per column) whose values fill ``keep_ratio`` of the dense weight's count:
    atoms * (out + code_density * in) <= keep_ratio * out * in, nonzeros = round(code_density * atoms).

    ``code_density`` 1 is the low-rank budget (rank = keep * out * in / (out + in))."""
    if not 0.0 < keep_ratio < 1.0:
        raise ConfigError(f"keep_ratio must be in (0, 1) (the fraction of the weight's values kept), got {keep_ratio}.")
    if not 0.0 < code_density <= 1.0:
        raise ConfigError(f"code_density (nonzeros per column / atoms) must be in (0, 1], got {code_density}.")
    atoms = math.floor(keep_ratio * out_features * in_features / (out_features + code_density * in_features))
    atoms = min(atoms, min(out_features, in_features))
    if atoms < 1:
        raise ConfigError(f"keep_ratio {keep_ratio} leaves no dictionary atom for a {out_features}x{in_features} "
                          "weight; keep more, or lower code_density.")
    return atoms, max(1, min(atoms, round(code_density * atoms)))


def damped(hessian: torch.Tensor, damp_ratio: float) -> torch.Tensor:
    """H + damp_ratio * mean(diag H) * I (the usual 1% relative damping)."""
    mean_diag = hessian.diagonal().mean()
    if not torch.isfinite(mean_diag) or mean_diag <= 0:
        raise NumericalError("the calibration Hessian X^T X has a non-positive or non-finite diagonal mean; "
                             "check that calibration tokens reached the layer.")
    return hessian + damp_ratio * mean_diag * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)


def whitened_basis(weight: torch.Tensor, hessian: torch.Tensor, damp_ratio: float) -> torch.Tensor:
    """Left singular vectors of W L, H = L L^T (``hessian`` already damped by ``damp_ratio``): the
    directions of W's outputs ordered by their energy on the calibration inputs (SVD-LLM's whitening)."""
    try:
        lower = torch.linalg.cholesky(hessian)
    except RuntimeError as error:
        raise NumericalError(f"the damped Hessian is not positive definite (damp_ratio {damp_ratio}): pass a larger "
                             "damp_ratio.") from error
    return torch.linalg.svd(weight @ lower, full_matrices=False)[0]


def data_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H E^T) / tr(W H W^T), E = W - approximation: the relative output error on X."""
    residual = weight - approximation
    return float(((residual @ hessian) * residual).sum() / ((weight @ hessian) * weight).sum())


def omp_supports(dictionary: torch.Tensor, targets: torch.Tensor, nonzeros: int) -> torch.Tensor:
    """Orthogonal matching pursuit for every column of ``targets`` [out, n] at once: long [n, nonzeros]
    atom indices, chosen greedily by the residual's correlation with the unit-norm atoms, the
    coefficients re-solved on the chosen atoms after each pick (Cholesky factor of the chosen atoms'
    Gram grown by one row per pick, so a pick costs O(n t^2), not a new O(n t^3) solve)."""
    unit = dictionary / dictionary.norm(dim=0).clamp_min(1e-12)
    gram = unit.T @ unit
    correlations = unit.T @ targets  # [atoms, n]
    atoms, n = correlations.shape
    columns = torch.arange(n, device=targets.device)
    chosen = torch.zeros(n, nonzeros, dtype=torch.long, device=targets.device)
    taken = torch.zeros(atoms, n, dtype=torch.bool, device=targets.device)
    factor = torch.zeros(n, nonzeros, nonzeros, dtype=targets.dtype, device=targets.device)  # L L^T = G_SS
    residual_corr = correlations
    for t in range(nonzeros):
        pick = residual_corr.abs().masked_fill(taken, -1.0).argmax(dim=0)
        chosen[:, t] = pick
        taken[pick, columns] = True
        if t:
            cross = gram[chosen[:, :t], pick[:, None]]  # [n, t]: G[S, p]
            row = torch.linalg.solve_triangular(factor[:, :t, :t], cross[:, :, None], upper=False)[..., 0]
            factor[:, t, :t] = row
            diagonal = (1.0 - (row * row).sum(dim=1)).clamp_min(1e-10)
        else:
            diagonal = torch.ones(n, dtype=targets.dtype, device=targets.device)
        factor[:, t, t] = diagonal.sqrt()
        lower = factor[:, : t + 1, : t + 1]
        rhs = correlations.T.gather(1, chosen[:, : t + 1])[:, :, None]
        coefficients = torch.cholesky_solve(rhs, lower, upper=False)[..., 0]  # [n, t+1]
        codes = torch.zeros_like(correlations).scatter_(0, chosen[:, : t + 1].T, coefficients.T)
        residual_corr = correlations - gram @ codes  # one GEMM instead of a gathered [atoms, n, t] product
    return chosen


def fit_codes(weight: torch.Tensor, dictionary: torch.Tensor, hessian: torch.Tensor, support: torch.Tensor,
              iterations: int = 60, tolerance: float = 1e-10) -> torch.Tensor:
    """argmin over C with the given supports of tr((W - D C) H (W - D C)^T), by conjugate gradients.

    The normal equations restricted to the supports, P(D^T D C H) = P(D^T W H) with P zeroing off
    the supports, form a symmetric positive (semi)definite system in the supported entries."""
    mask = torch.zeros(dictionary.shape[1], weight.shape[1], dtype=torch.bool, device=weight.device)
    mask.scatter_(0, support.T, True)
    gram = dictionary.T @ dictionary

    def apply(codes: torch.Tensor) -> torch.Tensor:
        return (gram @ codes @ hessian) * mask

    rhs = (dictionary.T @ weight @ hessian) * mask
    # start from the per-column least squares (exact when H is diagonal)
    codes = torch.zeros_like(rhs)
    sub_gram = gram[support[:, :, None], support[:, None, :]]
    eye = torch.eye(support.shape[1], dtype=gram.dtype, device=gram.device)
    start = torch.linalg.solve(sub_gram + 1e-8 * eye, (dictionary.T @ weight).T.gather(1, support))
    codes.scatter_(0, support.T, start.T)
    residual = rhs - apply(codes)
    direction = residual.clone()
    energy = float((residual * residual).sum())
    scale = float((rhs * rhs).sum()) or 1.0
    for _ in range(iterations):
        if energy <= tolerance * scale:
            break
        applied = apply(direction)
        curvature = float((direction * applied).sum())
        if curvature <= 0:
            break
        step = energy / curvature
        codes = codes + step * direction
        residual = residual - step * applied
        new_energy = float((residual * residual).sum())
        direction = residual + (new_energy / energy) * direction
        energy = new_energy
    return codes


def update_dictionary(weight: torch.Tensor, codes: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """argmin over D of tr((W - D C) H (W - D C)^T): D = W H C^T (C H C^T)^-1."""
    codes_h = codes @ hessian
    system = codes_h @ codes.T
    system = system + 1e-8 * system.diagonal().mean().clamp_min(1e-12) * torch.eye(
        system.shape[0], dtype=system.dtype, device=system.device)
    return torch.linalg.solve(system, (weight @ codes_h.T).T).T


def cospadi_factorize(weight: torch.Tensor, hessian: torch.Tensor | None, atoms: int, nonzeros: int, *,
                      iterations: int = 4, damp_ratio: float = 0.01, cg_iterations: int = 60) -> DictionaryFactors:
    """Fit W ~ D C (see the module docstring). ``hessian`` None: a weight-only fit (H = I).

    Computed in float64 (the whitening and the small solves are ill-conditioned in float32)."""
    if weight.ndim != 2:
        raise ConfigError(f"cospadi factorizes 2-D weights, got shape {tuple(weight.shape)}.")
    out_features, in_features = weight.shape
    if not 1 <= nonzeros <= atoms <= min(out_features, in_features):
        raise ConfigError(f"need 1 <= nonzeros ({nonzeros}) <= atoms ({atoms}) <= min(out, in) "
                          f"({min(out_features, in_features)}).")
    if not torch.isfinite(weight).all():
        raise NumericalError("the weight holds non-finite values; fix the model before factorizing it.")
    w = weight.detach().to(torch.float64)
    h = (torch.eye(in_features, dtype=torch.float64, device=w.device) if hessian is None
         else damped(hessian.detach().to(device=w.device, dtype=torch.float64), damp_ratio))
    dictionary = whitened_basis(w, h, damp_ratio)[:, :atoms].contiguous()  # the whitened rank-`atoms` subspace

    def codes_for(dictionary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if nonzeros == atoms:  # every atom in every column: low rank, C = D^+ W is the data-aware optimum too
            support = torch.arange(atoms, device=w.device).expand(in_features, atoms)
            return support, torch.linalg.lstsq(dictionary, w).solution
        support = omp_supports(dictionary, w, nonzeros)
        return support, fit_codes(w, dictionary, h, support, iterations=cg_iterations)

    support, codes = codes_for(dictionary)
    start_error = best_error = data_error(w, dictionary @ codes, h)
    best = (dictionary, codes, support)
    for _ in range(iterations):
        dictionary = update_dictionary(w, codes, h)
        dictionary = dictionary / dictionary.norm(dim=0).clamp_min(1e-12)
        support, codes = codes_for(dictionary)
        error = data_error(w, dictionary @ codes, h)
        if error < best_error:
            best_error, best = error, (dictionary, codes, support)
    dictionary, codes, support = best
    support = support.sort(dim=1).values
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return DictionaryFactors(dictionary.to(dtype), codes.to(dtype), support, best_error, start_error, iterations)


def whitened_svd_error(weight: torch.Tensor, hessian: torch.Tensor, rank: int, damp_ratio: float = 0.01) -> float:
    """Relative data-aware error of the best rank-``rank`` approximation in the H-weighted norm
    (truncated SVD of W L, un-whitened): the low-rank baseline CoSpaDi is compared with."""
    w = weight.detach().to(torch.float64)
    h = damped(hessian.detach().to(torch.float64), damp_ratio)
    basis = whitened_basis(w, h, damp_ratio)[:, :rank]
    return data_error(w, basis @ (basis.T @ w), h)
