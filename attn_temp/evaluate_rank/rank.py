"""Representation rank as an `evaluate` metric: numerical, effective (RankMe) and stable rank of a feature matrix.

Load it offline from inside the installed attn_temp package:

    import evaluate
    from attn_temp.measure import EVALUATE_MODULE_PATH
    rank = evaluate.load(EVALUATE_MODULE_PATH)
    rank.compute(features=features, rank_tolerance=1e-3, center=True)

The metrics are those of `attn_temp.metrics.FeatureStatistics`, so they equal what
`attn_temp.measure_representations` reports for the same features.
"""

import datasets
import evaluate
import numpy as np
import torch

from attn_temp.metrics import DEFAULT_CENTER, DEFAULT_RANK_TOLERANCE, FeatureStatistics

_DESCRIPTION = """\
Rank of a feature matrix X with one row per sample (N x d), from its singular values sigma_1 >= sigma_2 >= ...:
numerical rank #{k : sigma_k > rank_tolerance * sigma_1}, effective rank exp(-sum_k p_k log p_k) with
p_k = sigma_k / sum_j sigma_j (RankMe, Garrido et al. 2023) and stable rank sum_k sigma_k^2 / sigma_1^2.
By default the rows are centred first, so the ranks are those of the feature covariance.
"""

_KWARGS_DESCRIPTION = """
Args:
    features (`list` of `list` of `float`, or an (N, d) array): one feature vector per sample.
    rank_tolerance (`float`): relative threshold of the numerical rank, in [0, 1). Default 1e-3.
    center (`bool`): subtract the mean feature vector first. Default True.
    top_k (`int`): how many of the largest singular values to return. Default 10.

Returns:
    numerical_rank (`int`), effective_rank (`float`), stable_rank (`float`),
    top_singular_values (`list` of `float`), num_samples (`int`), feature_dim (`int`).

Examples:
    >>> rank = evaluate.load(EVALUATE_MODULE_PATH)  # doctest: +SKIP
    >>> rank.compute(features=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])["numerical_rank"]  # doctest: +SKIP
    2
"""

_CITATION = """\
@inproceedings{garrido2023rankme,
  title={RankMe: Assessing the Downstream Performance of Pretrained Self-Supervised Representations by Their Rank},
  author={Garrido, Quentin and Balestriero, Randall and Najman, Laurent and LeCun, Yann},
  booktitle={International Conference on Machine Learning},
  year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rank(evaluate.Metric):
    """Numerical, effective and stable rank of the matrix of the `features` added to it."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"features": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, features, rank_tolerance=DEFAULT_RANK_TOLERANCE, center=DEFAULT_CENTER, top_k=10):
        matrix = torch.as_tensor(np.asarray(features, dtype=np.float64))
        if matrix.dim() != 2 or matrix.shape[0] == 0:
            raise ValueError(
                f"Expected `features` as N >= 1 vectors of the same length, got an array of shape {tuple(matrix.shape)}."
            )
        if not torch.isfinite(matrix).all():
            raise ValueError("Expected finite `features`, got NaN or inf values.")
        statistics = FeatureStatistics(rank_tolerance=rank_tolerance, center=center)
        statistics.update(matrix)
        spectrum = statistics.compute()
        return {
            "numerical_rank": spectrum.numerical_rank,
            "effective_rank": spectrum.effective_rank,
            "stable_rank": spectrum.stable_rank,
            "top_singular_values": spectrum.singular_values[:top_k].tolist(),
            "num_samples": spectrum.num_samples,
            "feature_dim": spectrum.feature_dim,
        }
