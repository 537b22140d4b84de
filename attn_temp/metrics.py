"""Spectral and neural-collapse metrics of feature matrices, from streaming sufficient statistics.

A feature matrix X has one row per sample (N x d). Its singular values sigma_1 >= sigma_2 >= ... give:

    numerical rank  = #{k : sigma_k > gamma * sigma_1}                  (gamma = rank tolerance, 1e-3)
    effective rank  = exp(-sum_k p_k log p_k),  p_k = sigma_k / sum_j sigma_j   (RankMe)
    stable rank     = sum_k sigma_k^2 / sigma_1^2

`FeatureStatistics` never stores X. It accumulates float64 sufficient statistics of the shifted rows
x - c: row count, row sum, Gram matrix, the sum of row norms and, when labels are given, per-class
counts and sums. Memory is therefore O(d^2 + C d) whatever N is. The shift c is the mean of the first rows
seen. It changes nothing algebraically but keeps the centred Gram matrix from cancelling: transformer
features often have a mean far larger than their spread. `update` only adds to the statistics and
`compute` only reads them. Accumulators over disjoint rows add up (after moving to a common shift) to
the accumulator over all rows, which is how `sync` reduces them across processes.

The singular values of X (centred: X - 1 mu^T) are the square roots of the eigenvalues of the Gram
matrix (centred: X^T X - N mu mu^T). Eigenvalues below the float64 resolution of the Gram matrix
(`gram_noise_floor`, about 4e-7 * sigma_1 at d = 384) are set to zero. Above it, the values agree
with `torch.linalg.svdvals` of the materialised float64 matrix to about 1e-7 * sigma_1 (the tests check
1e-6 * sigma_1). Float32 features that are rank-deficient in exact arithmetic have a tail of
rounding-noise singular values near that floor. The Gram path cannot resolve that tail, so there the
effective rank can differ from a materialised SVD's by about 1e-6 relative.

Neural collapse (Papyan, Han and Donoho, "Prevalence of neural collapse during the terminal phase of
deep learning training", PNAS 2020) is computed from the same statistics, see `neural_collapse`.

Each metric has a functional form (`numerical_rank`, `effective_rank`, `stable_rank`,
`singular_values_from_gram`, `neural_collapse`, `nearest_class_center_mismatches`) used by the class.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_RANK_TOLERANCE = 1e-3

# Feature covariance, not raw second moments: the Tunnel Effect measurements (Masarczyk et al.,
# NeurIPS 2023) that the rank tolerance comes from took the rank of the feature covariance. Without
# centring, a large shared mean adds one dominant direction that carries no information about how
# many directions the samples spread over.
DEFAULT_CENTER = True

_FLOAT64_EPS = torch.finfo(torch.float64).eps


# ---------------------------------------------------------------------------------------------------
# Functional metrics
# ---------------------------------------------------------------------------------------------------


def _check_singular_values(singular_values: torch.Tensor, argument: str = "singular_values") -> torch.Tensor:
    values = torch.as_tensor(singular_values, dtype=torch.float64)
    if values.dim() != 1:
        raise ValueError(f"Expected `{argument}` to be a 1-D tensor, got shape {tuple(values.shape)}.")
    if not torch.isfinite(values).all():
        raise ValueError(f"Expected finite `{argument}`, got {values.tolist()[:10]} (NaN or inf present).")
    if (values < 0).any():
        raise ValueError(f"Expected non-negative `{argument}`, got minimum {values.min().item()}.")
    return values


def numerical_rank(singular_values: torch.Tensor, tolerance: float = DEFAULT_RANK_TOLERANCE) -> int:
    """Count the singular values above `tolerance * sigma_1`.

    rank_gamma(X) = #{k : sigma_k > gamma * sigma_1}. This equals
    `torch.linalg.matrix_rank(X, rtol=gamma)`. Note that a threshold gamma on the eigenvalues of the
    covariance X^T X / N is a threshold sqrt(gamma) on the singular values of X.

    Args:
        singular_values (`torch.Tensor`): 1-D, non-negative, in any order.
        tolerance (`float`): relative threshold gamma in [0, 1). Default 1e-3.

    Returns:
        `int`: the numerical rank, 0 for an all-zero spectrum.
    """
    values = _check_singular_values(singular_values)
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"Expected `tolerance` in [0, 1), got {tolerance}. The default is {DEFAULT_RANK_TOLERANCE}.")
    if values.numel() == 0:
        return 0
    largest = values.max()
    if largest == 0:
        return 0
    return int((values > tolerance * largest).sum().item())


def effective_rank(singular_values: torch.Tensor) -> float:
    """Compute the effective rank (RankMe, Garrido et al., ICML 2023) of a spectrum.

    p_k = sigma_k / sum_j sigma_j and effective rank = exp(-sum_k p_k log p_k), with 0 log 0 = 0.
    It is 1 for a single non-zero value, k for k equal values and between 1 and the number of
    non-zero values otherwise.

    Args:
        singular_values (`torch.Tensor`): 1-D, non-negative.

    Returns:
        `float`: the effective rank, 0.0 for an all-zero spectrum.
    """
    values = _check_singular_values(singular_values)
    total = values.sum()
    if total == 0:
        return 0.0
    probabilities = values / total
    entropy = -torch.special.xlogy(probabilities, probabilities).sum()
    return float(torch.exp(entropy).item())


def stable_rank(singular_values: torch.Tensor) -> float:
    """Compute the stable rank sum_k sigma_k^2 / sigma_1^2 = ||X||_F^2 / ||X||_2^2.

    Args:
        singular_values (`torch.Tensor`): 1-D, non-negative.

    Returns:
        `float`: the stable rank, 0.0 for an all-zero spectrum.
    """
    values = _check_singular_values(singular_values)
    if values.numel() == 0 or values.max() == 0:
        return 0.0
    return float((values.square().sum() / values.max().square()).item())


def centered_gram(gram: torch.Tensor, feature_sum: torch.Tensor, count: int) -> torch.Tensor:
    """Return (X - 1 mu^T)^T (X - 1 mu^T) = X^T X - s s^T / N from the Gram matrix and row sum s."""
    if count <= 0:
        raise ValueError(f"Expected a positive row `count`, got {count}.")
    return gram - torch.outer(feature_sum, feature_sum) / count


def gram_noise_floor(gram: torch.Tensor, largest_eigenvalue: float) -> float:
    """Return the eigenvalue below which a float64 Gram matrix of this size cannot resolve anything.

    Forming and diagonalising a d x d float64 Gram matrix leaves absolute errors of order
    d * eps * ||G||_2 with G the accumulated Gram matrix. For singular values this is
    sqrt(2 d eps) ~ 4e-7 * sigma_1 at d = 384. Pass G's largest eigenvalue: it bounds the error of the
    centred matrix computed from G too.
    """
    return 2.0 * gram.shape[0] * _FLOAT64_EPS * max(largest_eigenvalue, 0.0)


def singular_values_from_gram(
    gram: torch.Tensor,
    *,
    count: int,
    feature_sum: torch.Tensor | None = None,
    center: bool = DEFAULT_CENTER,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute the singular values of the feature matrix X from its Gram matrix X^T X.

    sigma_k = sqrt(lambda_k(X^T X)), or of X^T X - s s^T / N when `center` is True. Eigenvalues below
    `gram_noise_floor` are set to zero. Only min(N, d) values are returned, like
    `torch.linalg.svdvals(X)`.

    Args:
        gram (`torch.Tensor`): (d, d) Gram matrix (X - 1 c^T)^T (X - 1 c^T) of the rows shifted by
            `shift` c (c = 0 when not given), float64 preferred.
        count (`int`): number of rows N.
        feature_sum (`torch.Tensor`, *optional*): (d,) sum s of the shifted rows; required when `center`
            is True or `shift` is given.
        center (`bool`): subtract the mean row first (singular values of the centred matrix).
        shift (`torch.Tensor`, *optional*): (d,) the shift c. The centred spectrum does not depend on it.

    Returns:
        `torch.Tensor`: float64, descending, length min(N, d).
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"Expected a square (d, d) `gram`, got shape {tuple(gram.shape)}.")
    gram = gram.to(torch.float64)
    dimension = gram.shape[0]
    if count <= 0 or dimension == 0:
        return torch.zeros(0, dtype=torch.float64, device=gram.device)

    # Symmetrise: accumulated rounding leaves X^T X very slightly asymmetric, eigvalsh reads one half.
    gram = (gram + gram.T) / 2
    if feature_sum is None and (center or shift is not None):
        raise ValueError("Expected `feature_sum` when `center=True` or `shift` is given, got None.")
    if center:
        matrix = centered_gram(gram, feature_sum.to(gram), count)
        eigenvalues = _eigvalsh(matrix)
        # The rounding error of the centred matrix scales with the accumulated Gram matrix
        # G = centred + s s^T / N, whose largest eigenvalue is at most the sum of the two parts'.
        accumulated_top = eigenvalues[-1].item() + feature_sum.to(gram).square().sum().item() / count
    else:
        matrix = gram
        if shift is not None:
            # X^T X = (X - 1 c^T)^T (X - 1 c^T) + s c^T + c s^T + N c c^T
            shift = shift.to(gram)
            cross = torch.outer(feature_sum.to(gram), shift)
            matrix = gram + cross + cross.T + count * torch.outer(shift, shift)
        eigenvalues = _eigvalsh(matrix)
        accumulated_top = eigenvalues[-1].item()

    floor = gram_noise_floor(matrix, accumulated_top)
    eigenvalues = torch.where(eigenvalues > floor, eigenvalues, torch.zeros_like(eigenvalues))
    values = eigenvalues.flip(0).sqrt()
    return values[: min(count, dimension)]


@contextlib.contextmanager
def _one_thread():
    # A d x d float64 decomposition (d ~ 384) runs faster on one thread: on a busy 2-core machine
    # eigvalsh took 0.02 s on one thread and 0.48 s on two, where OpenMP threads wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _eigvalsh(matrix: torch.Tensor) -> torch.Tensor:
    with _one_thread():
        return torch.linalg.eigvalsh(matrix)


def feature_singular_values(features: torch.Tensor, *, center: bool = DEFAULT_CENTER) -> torch.Tensor:
    """Compute the singular values of a materialised (N, d) feature matrix with float64 SVD.

    This is the reference that the streaming path must match; it needs O(N d) memory.
    """
    if features.dim() != 2:
        raise ValueError(f"Expected `features` of shape (N, d), got {tuple(features.shape)}.")
    matrix = features.to(torch.float64)
    if center:
        matrix = matrix - matrix.mean(dim=0, keepdim=True)
    return torch.linalg.svdvals(matrix)


# ---------------------------------------------------------------------------------------------------
# Neural collapse
# ---------------------------------------------------------------------------------------------------


def _class_means(class_counts: torch.Tensor, class_sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    present = class_counts > 0
    means = class_sums[present] / class_counts[present].unsqueeze(1)
    return means, present


def neural_collapse(
    class_counts: torch.Tensor,
    class_sums: torch.Tensor,
    gram: torch.Tensor,
    *,
    classifier_weight: torch.Tensor | None = None,
) -> dict[str, float | int | None]:
    """Compute the neural-collapse metrics NC1, NC2 and NC3 of Papyan, Han and Donoho (2020).

    With class means mu_c over the C classes present, their average mu_G = (1/C) sum_c mu_c and the
    centred means m_c = mu_c - mu_G (rows of M, C x d):

        Sigma_W = (1/N) sum_c sum_{i in c} (h_i - mu_c)(h_i - mu_c)^T = (X^T X - sum_c n_c mu_c mu_c^T) / N
        Sigma_B = (1/C) sum_c m_c m_c^T
        nc1 = tr(Sigma_W Sigma_B^+) / C                        (within-class variability collapse)
        nc2 = || M M^T / ||M M^T||_F - (I - 11^T / C) / sqrt(C - 1) ||_F
                                                            (distance to a simplex equiangular tight frame)
        nc2_equinorm = std_c ||m_c|| / mean_c ||m_c||
        nc2_equiangularity = std_{c != c'} cos(m_c, m_c')
        nc2_max_angle = mean_{c != c'} |cos(m_c, m_c') + 1 / (C - 1)|
        nc3 = || W / ||W||_F - M / ||M||_F ||_F^2              (self-duality with classifier rows W)

    Standard deviations are population ones. mu_G is the mean of class means: it equals the global
    mean for balanced classes, which the paper assumes, and keeps sum_c m_c = 0 with imbalanced
    classes, as in the simplex ETF that nc2 compares with. All metrics tend to 0 under collapse.
    NC4 needs every sample again, see `nearest_class_center_mismatches`.

    Args:
        class_counts (`torch.Tensor`): (C_total,) samples per class label; labels with 0 are skipped.
        class_sums (`torch.Tensor`): (C_total, d) per-class feature sums.
        gram (`torch.Tensor`): (d, d) uncentred Gram matrix of all samples. The metrics do not change
            when every row is shifted by the same vector, so `class_sums` and `gram` may both be of
            shifted rows (as `FeatureStatistics` keeps them).
        classifier_weight (`torch.Tensor`, *optional*): (C_total, d) rows of the linear classifier,
            row c for label c; without it nc3 is None.

    Returns:
        `dict`: nc1, nc2, nc2_equinorm, nc2_equiangularity, nc2_max_angle, nc3 and num_classes.
    """
    counts = class_counts.to(torch.float64)
    sums = class_sums.to(torch.float64)
    gram = gram.to(torch.float64)
    if sums.dim() != 2 or counts.shape[0] != sums.shape[0]:
        raise ValueError(
            f"Expected `class_counts` (C,) and `class_sums` (C, d), got {tuple(counts.shape)} and {tuple(sums.shape)}."
        )
    means, present = _class_means(counts, sums)
    num_classes = int(present.sum().item())
    if num_classes < 2:
        raise ValueError(f"Expected samples of at least 2 classes for neural collapse, got {num_classes}.")
    total = counts.sum()

    # NC1: within-class covariance against the pseudo-inverse of the between-class covariance.
    within_scatter = gram - (means.T * counts[present]) @ means
    sigma_within = (within_scatter + within_scatter.T) / (2 * total)
    centred_means = means - means.mean(dim=0, keepdim=True)
    sigma_between = centred_means.T @ centred_means / num_classes
    with _one_thread():
        between_pinv = torch.linalg.pinv(sigma_between, hermitian=True)
    nc1 = torch.trace(sigma_within @ between_pinv) / num_classes

    # NC2: norms and angles of the centred class means against a simplex ETF.
    norms = centred_means.norm(dim=1)
    unit_means = centred_means / norms.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    cosines = unit_means @ unit_means.T
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=cosines.device)
    off_cosines = cosines[off_diagonal]
    mean_gram = centred_means @ centred_means.T
    simplex = torch.eye(num_classes, dtype=torch.float64, device=mean_gram.device) - 1.0 / num_classes
    nc2 = (mean_gram / mean_gram.norm() - simplex / math.sqrt(num_classes - 1)).norm()

    nc3 = None
    if classifier_weight is not None:
        weight = classifier_weight.detach().to(device=means.device, dtype=torch.float64)
        if weight.shape != sums.shape:
            raise ValueError(
                f"Expected `classifier_weight` of shape {tuple(sums.shape)} (one row per class label), "
                f"got {tuple(weight.shape)}."
            )
        weight = weight[present]
        nc3 = float((weight / weight.norm() - centred_means / centred_means.norm()).norm().square().item())

    return {
        "nc1": float(nc1.item()),
        "nc2": float(nc2.item()),
        "nc2_equinorm": float((norms.std(correction=0) / norms.mean()).item()),
        "nc2_equiangularity": float(off_cosines.std(correction=0).item()),
        "nc2_max_angle": float((off_cosines + 1.0 / (num_classes - 1)).abs().mean().item()),
        "nc3": nc3,
        "num_classes": num_classes,
    }


def class_means(
    class_counts: torch.Tensor, class_sums: torch.Tensor, shift: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the (C_present, d) float64 class means and the labels that have samples.

    `shift` is added back when `class_sums` are sums of shifted rows.
    """
    means, present = _class_means(class_counts.to(torch.float64), class_sums.to(torch.float64))
    if shift is not None:
        means = means + shift.to(means)
    labels = torch.nonzero(present).flatten()
    return means, labels


def nearest_class_center_mismatches(
    features: torch.Tensor,
    predictions: torch.Tensor,
    means: torch.Tensor,
    mean_labels: torch.Tensor,
) -> int:
    """Count the samples whose predicted label differs from the label of the nearest class mean.

    NC4 of Papyan et al. is this count over all samples divided by N. It needs the final class means,
    so it is a second pass over the features; call it chunk by chunk and add the counts.

    Args:
        features (`torch.Tensor`): (n, d) features of a chunk of samples.
        predictions (`torch.Tensor`): (n,) labels predicted by the network (argmax of its logits).
        means (`torch.Tensor`): (C, d) class means, as from `class_means`.
        mean_labels (`torch.Tensor`): (C,) label of each row of `means`.
    """
    features = features.to(device=means.device, dtype=torch.float64)
    # argmin_c ||h - mu_c||^2 = argmin_c (||mu_c||^2 - 2 h . mu_c)
    distances = means.square().sum(dim=1) - 2 * features @ means.T
    nearest = mean_labels.to(means.device)[distances.argmin(dim=1)]
    return int((nearest != predictions.to(means.device)).sum().item())


# ---------------------------------------------------------------------------------------------------
# Streaming accumulator
# ---------------------------------------------------------------------------------------------------


@dataclass
class Spectrum:
    """Spectral summary of one feature matrix."""

    num_samples: int
    feature_dim: int
    # Mean L2 norm of the rows (for logits: the mean per-sample logits norm).
    mean_norm: float
    centered: bool
    rank_tolerance: float
    # None when the accumulator did not track the Gram matrix (too many features).
    singular_values: torch.Tensor | None = None
    numerical_rank: int | None = None
    effective_rank: float | None = None
    stable_rank: float | None = None


def _all_reduce(tensor: torch.Tensor, accelerator: Any, op: str) -> torch.Tensor:
    """Reduce a tensor over all processes (`op` "sum" or "max"); a no-op in a single process."""
    if accelerator is not None:
        if accelerator.num_processes == 1:
            return tensor
        moved = tensor.to(accelerator.device)
        if op == "sum":
            reduced = accelerator.reduce(moved, reduction="sum")
        else:
            reduced = accelerator.gather(moved.unsqueeze(0)).amax(dim=0)
        return reduced.to(tensor.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reduced = tensor.clone()
        reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(reduced, op=reduce_op)
        return reduced
    return tensor


class FeatureStatistics:
    """Streaming rank metrics of a feature matrix from float64 sufficient statistics.

    Feed rows with `update(features, labels=None)` as often as needed and read the metrics with
    `compute()` (spectrum) or `compute_neural_collapse()`. Memory is O(d^2 + C d) for any number of
    rows. In several processes, `sync()` returns the statistics summed over all of them, so every
    process computes the same metrics.

    Args:
        rank_tolerance (`float`): gamma of the numerical rank, in [0, 1). Default 1e-3.
        center (`bool`): measure the centred matrix X - 1 mu^T (the feature covariance) instead of
            X. Default True, as in the Tunnel Effect measurements that the tolerance comes from.
        track_spectrum (`bool`): keep the Gram matrix. Set False for very wide features (a vocabulary's
            logits): only the row count and the mean row norm are kept then.

    Example:
        >>> stats = FeatureStatistics()
        >>> for chunk in torch.randn(1000, 8, dtype=torch.float64).split(100):
        ...     stats.update(chunk)
        >>> stats.compute().numerical_rank
        8
    """

    higher_is_better = None
    is_differentiable = False

    count: torch.Tensor
    norm_sum: torch.Tensor
    # Statistics of the shifted rows x - shift; shift is the mean of the first non-empty update.
    shift: torch.Tensor | None
    feature_sum: torch.Tensor | None
    gram: torch.Tensor | None
    class_counts: torch.Tensor | None
    class_sums: torch.Tensor | None

    def __init__(
        self,
        *,
        rank_tolerance: float = DEFAULT_RANK_TOLERANCE,
        center: bool = DEFAULT_CENTER,
        track_spectrum: bool = True,
    ) -> None:
        if not 0.0 <= rank_tolerance < 1.0:
            raise ValueError(
                f"Expected `rank_tolerance` in [0, 1), got {rank_tolerance}. The default is {DEFAULT_RANK_TOLERANCE}."
            )
        self.rank_tolerance = float(rank_tolerance)
        self.center = bool(center)
        self.track_spectrum = bool(track_spectrum)
        self.reset()

    def reset(self) -> None:
        """Drop all accumulated statistics."""
        self.feature_dim: int | None = None
        self.count = torch.zeros((), dtype=torch.int64)
        self.norm_sum = torch.zeros((), dtype=torch.float64)
        self.shift = None
        self.feature_sum = None
        self.gram = None
        self.class_counts = None
        self.class_sums = None

    def _allocate(self, feature_dim: int, device: torch.device) -> None:
        self.feature_dim = feature_dim
        self.count = self.count.to(device)
        self.norm_sum = self.norm_sum.to(device)
        if self.track_spectrum:
            self.shift = torch.zeros(feature_dim, dtype=torch.float64, device=device)
            self.feature_sum = torch.zeros(feature_dim, dtype=torch.float64, device=device)
            self.gram = torch.zeros(feature_dim, feature_dim, dtype=torch.float64, device=device)

    def _grow_classes(self, num_classes: int) -> None:
        device = self.count.device
        old = 0 if self.class_counts is None else self.class_counts.shape[0]
        if num_classes <= old:
            return
        counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
        sums = torch.zeros(num_classes, self.feature_dim, dtype=torch.float64, device=device)
        if self.class_counts is not None:
            counts[:old] = self.class_counts
            sums[:old] = self.class_sums
        self.class_counts, self.class_sums = counts, sums

    def update(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add the rows of `features` (N, d), and their integer class `labels` (N,) if given."""
        if features.dim() != 2:
            raise ValueError(f"Expected `features` of shape (N, d), got {tuple(features.shape)}.")
        if self.feature_dim is None:
            self._allocate(features.shape[1], features.device)
        elif features.shape[1] != self.feature_dim:
            raise ValueError(f"Expected features with {self.feature_dim} columns, got {features.shape[1]}.")
        rows = features.detach().to(device=self.count.device, dtype=torch.float64)
        if labels is not None:
            labels = self._check_labels(labels, rows.shape[0])
        if rows.shape[0] == 0:
            return

        self.norm_sum += rows.norm(dim=1).sum()
        if self.track_spectrum:
            if self.count == 0:
                self.shift = rows.mean(dim=0)
            rows = rows - self.shift
            self.feature_sum += rows.sum(dim=0)
            self.gram.addmm_(rows.T, rows)
        self.count += rows.shape[0]

        if labels is not None:
            self._grow_classes(int(labels.max().item()) + 1)
            self.class_counts += torch.bincount(labels, minlength=self.class_counts.shape[0])
            self.class_sums.index_add_(0, labels, rows)

    def _check_labels(self, labels: torch.Tensor, num_rows: int) -> torch.Tensor:
        if not self.track_spectrum:
            raise ValueError("Expected no `labels` when `track_spectrum=False`: neural collapse needs the Gram matrix.")
        labels = labels.detach().to(self.count.device)
        if labels.shape != (num_rows,) or labels.is_floating_point():
            raise ValueError(f"Expected integer `labels` of shape ({num_rows},), got {labels.dtype} {tuple(labels.shape)}.")
        if num_rows and labels.min() < 0:
            raise ValueError(f"Expected non-negative class `labels`, got minimum {labels.min().item()}.")
        return labels

    def _moved_to_shift(self, shift: torch.Tensor, feature_dim: int, num_classes: int) -> dict[str, torch.Tensor]:
        """Return this process's statistics re-expressed for rows shifted by `shift`, padded to the given sizes."""
        device = self.count.device
        count = self.count.to(torch.float64)
        feature_sum = torch.zeros(feature_dim, dtype=torch.float64, device=device)
        gram = torch.zeros(feature_dim, feature_dim, dtype=torch.float64, device=device)
        class_counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
        class_sums = torch.zeros(num_classes, feature_dim, dtype=torch.float64, device=device)
        if self.feature_dim is not None and self.count > 0:
            # x - shift = (x - own shift) + delta
            delta = self.shift - shift
            cross = torch.outer(self.feature_sum, delta)
            gram = self.gram + cross + cross.T + count * torch.outer(delta, delta)
            feature_sum = self.feature_sum + count * delta
            if self.class_counts is not None:
                size = self.class_counts.shape[0]
                class_counts[:size] = self.class_counts
                class_sums[:size] = self.class_sums + self.class_counts.to(torch.float64).unsqueeze(1) * delta
        return {
            "feature_sum": feature_sum,
            "gram": gram,
            "class_counts": class_counts,
            "class_sums": class_sums,
        }

    def sync(self, accelerator: Any = None) -> FeatureStatistics:
        """Return a new accumulator holding the statistics summed over all processes.

        Uses `accelerator.reduce` when an `accelerate.Accelerator` is given, else
        `torch.distributed.all_reduce` when a process group is initialised, else returns a copy.
        Every process must call it. `self` is left unchanged, so accumulation can continue.
        """
        synced = FeatureStatistics(
            rank_tolerance=self.rank_tolerance, center=self.center, track_spectrum=self.track_spectrum
        )
        device = self.count.device
        # Shapes must agree before summing: a process may have seen no rows or fewer classes.
        shape = torch.tensor(
            [self.feature_dim or 0, 0 if self.class_counts is None else self.class_counts.shape[0]],
            dtype=torch.int64,
            device=device,
        )
        feature_dim, num_classes = (int(v) for v in _all_reduce(shape, accelerator, "max").tolist())
        if feature_dim == 0:
            return synced

        synced._allocate(feature_dim, device)
        synced.count = _all_reduce(self.count.clone(), accelerator, "sum")
        synced.norm_sum = _all_reduce(self.norm_sum.clone(), accelerator, "sum")
        if not self.track_spectrum or synced.count == 0:
            return synced

        # The common shift is the count-weighted mean of the processes' shifts: a sum, like the rest.
        weighted_shift = torch.zeros(feature_dim, dtype=torch.float64, device=device)
        if self.feature_dim is not None and self.count > 0:
            weighted_shift = self.shift * self.count.to(torch.float64)
        shift = _all_reduce(weighted_shift, accelerator, "sum") / synced.count.to(torch.float64)

        moved = self._moved_to_shift(shift, feature_dim, num_classes)
        synced.shift = shift
        synced.feature_sum = _all_reduce(moved["feature_sum"], accelerator, "sum")
        synced.gram = _all_reduce(moved["gram"], accelerator, "sum")
        if num_classes:
            synced.class_counts = _all_reduce(moved["class_counts"], accelerator, "sum")
            synced.class_sums = _all_reduce(moved["class_sums"], accelerator, "sum")
        return synced

    @property
    def num_samples(self) -> int:
        """Number of rows seen."""
        return int(self.count.item())

    def compute(self) -> Spectrum:
        """Compute the spectrum and rank metrics of the rows seen so far."""
        count = self.num_samples
        if count == 0:
            raise ValueError("Expected at least one row before `compute()`, got none: call `update()` first.")
        spectrum = Spectrum(
            num_samples=count,
            feature_dim=self.feature_dim,
            mean_norm=float((self.norm_sum / count).item()),
            centered=self.center,
            rank_tolerance=self.rank_tolerance,
        )
        if not self.track_spectrum:
            return spectrum
        values = singular_values_from_gram(
            self.gram, count=count, feature_sum=self.feature_sum, center=self.center, shift=self.shift
        )
        spectrum.singular_values = values.cpu()
        spectrum.numerical_rank = numerical_rank(values, self.rank_tolerance)
        spectrum.effective_rank = effective_rank(values)
        spectrum.stable_rank = stable_rank(values)
        return spectrum

    def compute_neural_collapse(self, classifier_weight: torch.Tensor | None = None) -> dict[str, float | int | None]:
        """Compute NC1 to NC3 (see `neural_collapse`) from rows that came with labels."""
        if self.class_counts is None:
            raise ValueError("Expected rows with `labels` before `compute_neural_collapse()`, got none.")
        if int(self.class_counts.sum().item()) != self.num_samples:
            raise ValueError(
                f"Expected labels for every row, got {int(self.class_counts.sum().item())} labels for "
                f"{self.num_samples} rows: pass labels to every `update()` call or to none."
            )
        counts, sums = self.class_counts, self.class_sums
        if classifier_weight is not None and classifier_weight.shape[0] > counts.shape[0]:
            # Labels at the end of the range that no sample had still have a classifier row.
            missing = classifier_weight.shape[0] - counts.shape[0]
            counts = torch.cat([counts, counts.new_zeros(missing)])
            sums = torch.cat([sums, sums.new_zeros(missing, sums.shape[1])])
        return neural_collapse(counts, sums, self.gram, classifier_weight=classifier_weight)

    def class_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the class means (C_present, d) and their labels (C_present,)."""
        if self.class_counts is None:
            raise ValueError("Expected rows with `labels` before `class_means()`, got none.")
        return class_means(self.class_counts, self.class_sums, self.shift)
