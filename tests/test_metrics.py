"""Spectral and neural-collapse metrics against materialised references (SVD, matrix_rank, direct NC formulas)."""

import math

import pytest
import torch

from attn_temp.metrics import (
    FeatureStatistics,
    class_means,
    effective_rank,
    feature_singular_values,
    nearest_class_center_mismatches,
    neural_collapse,
    numerical_rank,
    singular_values_from_gram,
    stable_rank,
)


# The small LAPACK calls here run faster on one thread (see the fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def low_rank_features(num_samples, feature_dim, rank, *, offset=0.0, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(num_samples, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, feature_dim, generator=generator, dtype=torch.float64)
    shift = offset * torch.randn(feature_dim, generator=generator, dtype=torch.float64)
    return (left @ right + shift).to(dtype)


def streamed(features, chunk=37, labels=None, **kwargs):
    statistics = FeatureStatistics(**kwargs)
    label_chunks = labels.split(chunk) if labels is not None else [None] * len(features.split(chunk))
    for rows, row_labels in zip(features.split(chunk), label_chunks):
        statistics.update(rows, row_labels)
    return statistics


def assert_spectra_close(got, reference, relative=1e-6):
    assert got.shape == reference.shape
    assert (got - reference).abs().max() <= relative * reference[0]


class TestFunctionalRank:
    def test_numerical_rank_matches_matrix_rank(self):
        for rank in (1, 5, 17):
            features = low_rank_features(200, 32, rank)
            values = torch.linalg.svdvals(features)
            assert numerical_rank(values, 1e-3) == torch.linalg.matrix_rank(features, rtol=1e-3).item() == rank

    def test_numerical_rank_tolerance_threshold(self):
        values = torch.tensor([1.0, 0.5, 2e-3, 5e-4, 0.0])
        assert numerical_rank(values, 1e-3) == 3
        assert numerical_rank(values, 1e-2) == 2
        assert numerical_rank(values, 0.0) == 4

    def test_zero_spectrum_gives_zero(self):
        zeros = torch.zeros(5)
        assert numerical_rank(zeros) == 0
        assert effective_rank(zeros) == 0.0
        assert stable_rank(zeros) == 0.0

    def test_effective_rank_known_spectra(self):
        assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
        assert effective_rank(torch.full((7,), 2.5)) == pytest.approx(7.0)
        # p = (1/2, 1/4, 1/4): entropy 1.5 log 2, effective rank 2^1.5.
        assert effective_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(2**1.5)

    def test_stable_rank_known_spectra(self):
        assert stable_rank(torch.tensor([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
        assert stable_rank(torch.tensor([3.0, 1.0])) == pytest.approx(10 / 9)

    def test_invalid_spectrum_rejected(self):
        with pytest.raises(ValueError, match="non-negative"):
            effective_rank(torch.tensor([1.0, -0.1]))
        with pytest.raises(ValueError, match="finite"):
            stable_rank(torch.tensor([1.0, float("nan")]))
        with pytest.raises(ValueError, match="tolerance"):
            numerical_rank(torch.tensor([1.0]), 1.5)


class TestGramSpectrum:
    @pytest.mark.parametrize("center", [True, False])
    def test_matches_svdvals(self, center):
        features = low_rank_features(300, 48, 20, offset=3.0)
        gram = features.T @ features
        got = singular_values_from_gram(gram, count=300, feature_sum=features.sum(0), center=center)
        assert_spectra_close(got, feature_singular_values(features, center=center))

    def test_fewer_samples_than_features(self):
        features = low_rank_features(10, 40, 40)
        got = singular_values_from_gram(features.T @ features, count=10, feature_sum=features.sum(0))
        reference = feature_singular_values(features)
        assert got.shape == (10,)
        assert_spectra_close(got, reference)
        # Centring removes one direction: 10 samples span 9.
        assert numerical_rank(got) == 9

    def test_centred_needs_feature_sum(self):
        with pytest.raises(ValueError, match="feature_sum"):
            singular_values_from_gram(torch.eye(3), count=4, center=True)


class TestFeatureStatistics:
    @pytest.mark.parametrize("center", [True, False])
    def test_streaming_equals_materialised(self, center):
        # A large shared mean, as in transformer hidden states, must not cost precision.
        features = low_rank_features(500, 64, 64, offset=50.0, dtype=torch.float32)
        spectrum = streamed(features, center=center).compute()
        reference = feature_singular_values(features, center=center)
        assert_spectra_close(spectrum.singular_values, reference)
        assert spectrum.numerical_rank == torch.linalg.matrix_rank(
            features.double() - (features.double().mean(0) if center else 0), rtol=1e-3
        ).item()
        assert spectrum.effective_rank == pytest.approx(effective_rank(reference), rel=1e-6)
        assert spectrum.stable_rank == pytest.approx(stable_rank(reference), rel=1e-6)
        assert spectrum.num_samples == 500
        assert spectrum.feature_dim == 64

    def test_rank_deficient_streaming(self):
        features = low_rank_features(500, 64, 40, offset=50.0)
        spectrum = streamed(features).compute()
        reference = feature_singular_values(features)
        assert_spectra_close(spectrum.singular_values, reference)
        assert spectrum.numerical_rank == 40
        # Values below the Gram matrix's float64 resolution are exact zeros, not rounding noise.
        assert (spectrum.singular_values[40:] == 0).all()
        assert spectrum.effective_rank == pytest.approx(effective_rank(reference), rel=1e-6)

    def test_chunking_does_not_change_result(self):
        features = low_rank_features(400, 16, 16, offset=2.0)
        whole = streamed(features, chunk=400).compute()
        pieces = streamed(features, chunk=7).compute()
        torch.testing.assert_close(whole.singular_values, pieces.singular_values, rtol=1e-10, atol=1e-10)

    def test_mean_norm_is_mean_row_norm(self):
        features = low_rank_features(50, 6, 6)
        assert streamed(features).compute().mean_norm == pytest.approx(features.norm(dim=1).mean().item())

    def test_without_spectrum_keeps_count_and_norm(self):
        features = low_rank_features(30, 5, 5)
        spectrum = streamed(features, track_spectrum=False).compute()
        assert spectrum.num_samples == 30
        assert spectrum.singular_values is None
        assert spectrum.numerical_rank is None

    def test_compute_before_update_raises(self):
        with pytest.raises(ValueError, match="update"):
            FeatureStatistics().compute()

    def test_width_mismatch_raises(self):
        statistics = FeatureStatistics()
        statistics.update(torch.randn(4, 3))
        with pytest.raises(ValueError, match="3 columns"):
            statistics.update(torch.randn(4, 5))

    def test_reset_forgets_rows(self):
        statistics = streamed(low_rank_features(20, 4, 4))
        statistics.reset()
        assert statistics.num_samples == 0

    def test_sync_single_process_is_copy(self):
        features = low_rank_features(60, 8, 8, offset=4.0)
        statistics = streamed(features)
        synced = statistics.sync()
        torch.testing.assert_close(synced.compute().singular_values, statistics.compute().singular_values)
        assert synced is not statistics


def simplex_etf_features(num_classes, per_class, feature_dim, noise=0.0, seed=0):
    """Class means on a simplex equiangular tight frame (plus an offset), samples = mean + noise."""
    generator = torch.Generator().manual_seed(seed)
    simplex = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    basis, _ = torch.linalg.qr(torch.randn(feature_dim, num_classes, generator=generator, dtype=torch.float64))
    means = simplex @ basis.T * 5.0 + 3.0  # (C, d); the offset is the global mean
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = means[labels] + noise * torch.randn(len(labels), feature_dim, generator=generator, dtype=torch.float64)
    return features, labels, means


def direct_neural_collapse(features, labels, weight):
    """NC1 to NC4 from the materialised features, following Papyan et al. (2020) literally."""
    classes = labels.unique()
    means = torch.stack([features[labels == c].mean(0) for c in classes])
    global_mean = means.mean(0)
    centred = means - global_mean
    within = sum(
        (features[labels == c] - means[i]).T @ (features[labels == c] - means[i]) for i, c in enumerate(classes)
    ) / len(features)
    between = centred.T @ centred / len(classes)
    nc1 = torch.trace(within @ torch.linalg.pinv(between, hermitian=True)) / len(classes)
    gram = centred @ centred.T
    simplex = torch.eye(len(classes), dtype=torch.float64) - 1.0 / len(classes)
    nc2 = (gram / gram.norm() - simplex / math.sqrt(len(classes) - 1)).norm()
    nc3 = (weight / weight.norm() - centred / centred.norm()).norm() ** 2
    nearest = classes[torch.cdist(features, means).argmin(1)]
    predictions = (features @ weight.T).argmax(1)
    nc4 = (nearest != predictions).double().mean()
    return {"nc1": nc1.item(), "nc2": nc2.item(), "nc3": nc3.item(), "nc4": nc4.item()}


class TestNeuralCollapse:
    def test_simplex_etf_is_collapsed(self):
        features, labels, means = simplex_etf_features(5, 40, 16, noise=1e-6)
        statistics = streamed(features, labels=labels)
        centred = means - means.mean(0)
        result = statistics.compute_neural_collapse(classifier_weight=centred)
        assert result["nc1"] < 1e-9
        assert result["nc2"] < 1e-6
        assert result["nc2_equinorm"] < 1e-6
        assert result["nc2_equiangularity"] < 1e-6
        assert result["nc2_max_angle"] < 1e-6
        assert result["nc3"] < 1e-9
        assert result["num_classes"] == 5

    def test_random_features_match_direct_formulas(self):
        generator = torch.Generator().manual_seed(1)
        features = torch.randn(300, 12, generator=generator, dtype=torch.float64) + 7.0
        labels = torch.randint(0, 4, (300,), generator=generator)
        weight = torch.randn(4, 12, generator=generator, dtype=torch.float64)
        statistics = streamed(features, labels=labels)
        result = statistics.compute_neural_collapse(classifier_weight=weight)
        reference = direct_neural_collapse(features, labels, weight)
        assert result["nc1"] == pytest.approx(reference["nc1"], rel=1e-8)
        assert result["nc2"] == pytest.approx(reference["nc2"], rel=1e-8)
        assert result["nc3"] == pytest.approx(reference["nc3"], rel=1e-8)
        # Random features are far from collapse.
        assert result["nc1"] > 1.0

        means, mean_labels = statistics.class_means()
        predictions = (features @ weight.T).argmax(1)
        mismatches = sum(
            nearest_class_center_mismatches(rows, row_predictions, means, mean_labels)
            for rows, row_predictions in zip(features.split(50), predictions.split(50))
        )
        assert mismatches / 300 == pytest.approx(reference["nc4"])
        assert 0 < reference["nc4"] < 1

    def test_absent_class_is_skipped(self):
        features, labels, _ = simplex_etf_features(3, 10, 6, noise=0.1)
        labels = labels.clone()
        labels[labels == 1] = 3  # labels 0, 2, 3: class 1 has no sample
        result = streamed(features, labels=labels).compute_neural_collapse()
        assert result["num_classes"] == 3
        assert result["nc3"] is None

    def test_class_means_add_back_shift(self):
        features, labels, means = simplex_etf_features(4, 5, 8)
        got, got_labels = streamed(features, labels=labels).class_means()
        torch.testing.assert_close(got, means)
        assert got_labels.tolist() == [0, 1, 2, 3]

    def test_single_class_rejected(self):
        features = torch.randn(10, 3, dtype=torch.float64)
        with pytest.raises(ValueError, match="at least 2 classes"):
            streamed(features, labels=torch.zeros(10, dtype=torch.long)).compute_neural_collapse()

    def test_functional_matches_class(self):
        features, labels, _ = simplex_etf_features(3, 20, 5, noise=0.5)
        statistics = streamed(features, labels=labels)
        counts = torch.bincount(labels)
        sums = torch.zeros(3, 5, dtype=torch.float64).index_add_(0, labels, features)
        direct = neural_collapse(counts, sums, features.T @ features)
        assert direct["nc1"] == pytest.approx(statistics.compute_neural_collapse()["nc1"], rel=1e-8)
        assert class_means(counts, sums)[0].shape == (3, 5)

    def test_bad_labels_rejected(self):
        statistics = FeatureStatistics()
        with pytest.raises(ValueError, match="integer `labels`"):
            statistics.update(torch.randn(4, 2), torch.tensor([0.0, 1.0, 0.0, 1.0]))
        with pytest.raises(ValueError, match="non-negative"):
            statistics.update(torch.randn(2, 2), torch.tensor([0, -1]))
