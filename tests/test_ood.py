"""Tests of attn_temp.ood on constructed features with known expected results."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

from attn_temp import ood


def gaussian_classes(rng, num_classes, dimension, count, spread=3.0):
    """Sample `count` points around `num_classes` random class means (well separated for spread >= 3)."""
    means = rng.normal(size=(num_classes, dimension)) * spread
    labels = rng.integers(0, num_classes, size=count)
    return means[labels] + rng.normal(size=(count, dimension)), labels


def low_rank_classes(rng, rank, dimension, count):
    """Put 2 * rank classes at +-scale_i * e_i of a random rank-dimensional subspace of R^dimension.

    The scales decrease along the axes, so the principal directions are ordered, and dropping the last
    axis merges its two classes: every k < rank loses at least 1 / (2 * rank) of the accuracy.
    """
    scales = np.linspace(5.0, 2.0, rank)
    labels = rng.integers(0, 2 * rank, size=count)
    latent = np.zeros((count, rank))
    axis, sign = labels // 2, np.where(labels % 2 == 0, 1.0, -1.0)
    latent[np.arange(count), axis] = sign * scales[axis]
    latent += 0.1 * rng.normal(size=latent.shape)
    basis, _ = np.linalg.qr(rng.normal(size=(dimension, rank)))
    features = latent @ basis.T + 0.01 * rng.normal(size=(count, dimension))
    return features, labels


def reference_fpr_at_95_tpr(id_scores, ood_scores):
    """Accept as in-distribution every score <= t, with the smallest t that accepts 95% of ID samples."""
    for threshold in np.sort(np.unique(np.concatenate([id_scores, ood_scores]))):
        if np.mean(id_scores <= threshold) >= 0.95:
            return float(np.mean(ood_scores <= threshold))
    raise AssertionError("unreachable: the largest score accepts every sample")


# --------------------------------------------------------------------------------------------------
# Linear probes
# --------------------------------------------------------------------------------------------------


class TestLinearProbe:
    def test_separable_classes(self):
        rng = np.random.default_rng(0)
        features, labels = gaussian_classes(rng, 5, 16, 600)
        accuracy = ood.linear_probe_accuracy(features[:400], labels[:400], features[400:], labels[400:])
        assert accuracy == pytest.approx(1.0, abs=0.01)

    def test_ridge_probe(self):
        rng = np.random.default_rng(0)
        features, labels = gaussian_classes(rng, 5, 16, 600)
        accuracy = ood.linear_probe_accuracy(features[:400], labels[:400], features[400:], labels[400:], probe="ridge")
        assert accuracy == pytest.approx(1.0, abs=0.01)

    def test_random_labels_near_chance(self):
        rng = np.random.default_rng(1)
        features = rng.normal(size=(800, 16))
        labels = rng.integers(0, 4, size=800)
        accuracy = ood.linear_probe_accuracy(features[:400], labels[:400], features[400:], labels[400:])
        assert 0.15 < accuracy < 0.40

    def test_torch_and_numpy_agree(self):
        rng = np.random.default_rng(2)
        features, labels = gaussian_classes(rng, 4, 8, 300, spread=0.7)
        from_numpy = ood.linear_probe_accuracy(features[:200], labels[:200], features[200:], labels[200:])
        tensor = torch.from_numpy(features).float()
        from_torch = ood.linear_probe_accuracy(
            tensor[:200], torch.from_numpy(labels[:200]), tensor[200:], torch.from_numpy(labels[200:])
        )
        assert 0.4 < from_numpy < 1.0
        assert from_torch == pytest.approx(from_numpy, abs=0.01)

    def test_deterministic(self):
        rng = np.random.default_rng(3)
        features, labels = gaussian_classes(rng, 6, 12, 400, spread=0.5)
        first = ood.linear_probe_accuracy(features[:300], labels[:300], features[300:], labels[300:])
        second = ood.linear_probe_accuracy(features[:300], labels[:300], features[300:], labels[300:])
        assert first == second

    def test_probe_layers(self):
        rng = np.random.default_rng(4)
        informative, labels = gaussian_classes(rng, 3, 8, 400)
        noise = rng.normal(size=(400, 8))
        train = {"layer.0": noise[:300], "layer.1": informative[:300]}
        test = {"layer.0": noise[300:], "layer.1": informative[300:]}
        accuracies = ood.probe_layers(train, labels[:300], test, labels[300:])
        assert list(accuracies) == ["layer.0", "layer.1"]
        assert accuracies["layer.1"] > 0.95
        assert accuracies["layer.0"] < 0.6


class TestProbeBadInput:
    def setup_method(self):
        rng = np.random.default_rng(5)
        self.features = rng.normal(size=(20, 4))
        self.labels = np.arange(20) % 2

    def test_mismatched_label_length(self):
        with pytest.raises(ValueError, match="`train_labels` to have 20 entries"):
            ood.linear_probe_accuracy(self.features, self.labels[:-1], self.features, self.labels)

    def test_empty_features(self):
        with pytest.raises(ValueError, match="non-empty `test_features`"):
            ood.linear_probe_accuracy(self.features, self.labels, np.zeros((0, 4)), np.zeros(0))

    def test_single_class(self):
        with pytest.raises(ValueError, match="single class"):
            ood.linear_probe_accuracy(self.features, np.zeros(20, dtype=int), self.features, self.labels)

    def test_feature_dimension_mismatch(self):
        with pytest.raises(ValueError, match="same layer"):
            ood.linear_probe_accuracy(self.features, self.labels, self.features[:, :3], self.labels)

    def test_non_finite_features(self):
        features = self.features.copy()
        features[3, 1] = np.nan
        with pytest.raises(ValueError, match="diverged"):
            ood.linear_probe_accuracy(features, self.labels, self.features, self.labels)

    def test_float_labels_with_fractions(self):
        with pytest.raises(ValueError, match="integer class labels"):
            ood.linear_probe_accuracy(self.features, self.labels + 0.5, self.features, self.labels)

    def test_invalid_regularisation(self):
        with pytest.raises(ValueError, match="`C`"):
            ood.linear_probe_accuracy(self.features, self.labels, self.features, self.labels, C=0.0)

    def test_unknown_probe(self):
        with pytest.raises(ValueError, match="'svm'"):
            ood.linear_probe_accuracy(self.features, self.labels, self.features, self.labels, probe="svm")

    def test_missing_test_layer(self):
        with pytest.raises(ValueError, match="layer.1"):
            ood.probe_layers(
                {"layer.0": self.features, "layer.1": self.features}, self.labels, {"layer.0": self.features}, self.labels
            )

    def test_no_layers(self):
        with pytest.raises(ValueError, match="empty"):
            ood.probe_layers({}, self.labels, {}, self.labels)


# --------------------------------------------------------------------------------------------------
# OOD detection
# --------------------------------------------------------------------------------------------------


class TestDetectionMetrics:
    def test_auroc_matches_sklearn(self):
        rng = np.random.default_rng(6)
        id_scores = rng.normal(size=300)
        ood_scores = rng.normal(loc=0.8, size=200)
        result = ood.ood_detection_metrics(id_scores, ood_scores)
        labels = np.r_[np.zeros(300), np.ones(200)]
        assert result["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[id_scores, ood_scores]), abs=1e-12)
        assert 0.6 < result["auroc"] < 0.85

    def test_fpr_matches_reference(self):
        rng = np.random.default_rng(7)
        for _ in range(5):
            # Rounded scores produce ties, the case where threshold conventions differ.
            id_scores = np.round(rng.normal(size=250), 1)
            ood_scores = np.round(rng.normal(loc=1.0, size=180), 1)
            result = ood.ood_detection_metrics(id_scores, ood_scores)
            assert result["fpr_at_95_tpr"] == pytest.approx(reference_fpr_at_95_tpr(id_scores, ood_scores))

    def test_fpr_hand_computed(self):
        # 95% of the ID scores 0..99 are <= 94, and two of the four OOD scores are <= 94.
        result = ood.ood_detection_metrics(np.arange(100.0), np.array([10.0, 50.0, 94.5, 200.0]))
        assert result["fpr_at_95_tpr"] == pytest.approx(0.5)

    def test_perfect_and_reversed(self):
        perfect = ood.ood_detection_metrics(np.zeros(10) - 1.0, np.ones(10))
        assert perfect == {"auroc": 1.0, "fpr_at_95_tpr": 0.0}
        reversed_scores = ood.ood_detection_metrics(np.ones(10), np.zeros(10) - 1.0)
        assert reversed_scores["auroc"] == 0.0
        assert reversed_scores["fpr_at_95_tpr"] == 1.0

    def test_bad_scores(self):
        with pytest.raises(ValueError, match="non-empty `ood_scores`"):
            ood.ood_detection_metrics(np.ones(3), np.array([]))
        with pytest.raises(ValueError, match="finite `in_distribution_scores`"):
            ood.ood_detection_metrics(np.array([1.0, np.nan]), np.ones(3))
        with pytest.raises(ValueError, match=r"shape \(N,\)"):
            ood.ood_detection_metrics(np.ones((3, 2)), np.ones(3))


class TestScores:
    def setup_method(self):
        rng = np.random.default_rng(8)
        labels = rng.integers(0, 5, size=200)
        # In-distribution: one large logit per sample. OOD: small logits of similar size.
        self.id_logits = rng.normal(scale=0.5, size=(200, 5))
        self.id_logits[np.arange(200), labels] += 6.0
        self.ood_logits = rng.normal(scale=0.5, size=(200, 5))

    def test_msp_sign(self):
        id_scores = ood.msp_score(self.id_logits)
        ood_scores = ood.msp_score(self.ood_logits)
        assert ood_scores.mean() > id_scores.mean()
        assert np.all((id_scores >= -1.0) & (id_scores <= -0.2))
        assert ood.ood_detection_metrics(id_scores, ood_scores)["auroc"] > 0.99

    def test_energy_sign(self):
        id_scores = ood.energy_score(self.id_logits)
        ood_scores = ood.energy_score(self.ood_logits)
        assert ood_scores.mean() > id_scores.mean()
        assert ood.ood_detection_metrics(id_scores, ood_scores)["auroc"] > 0.99

    def test_energy_formula(self):
        expected = -2.0 * logsumexp(self.id_logits / 2.0, axis=1)
        np.testing.assert_allclose(ood.energy_score(self.id_logits, temperature=2.0), expected)

    def test_energy_raw_vs_effective_logits(self):
        # Energy of raw logits z at temperature T is T times the energy of z / T at temperature 1,
        # so both give the same AUROC.
        temperature = 4.0
        raw = self.id_logits * temperature
        np.testing.assert_allclose(
            ood.energy_score(raw, temperature=temperature), temperature * ood.energy_score(self.id_logits)
        )

    def test_energy_invalid_temperature(self):
        with pytest.raises(ValueError, match="`temperature`"):
            ood.energy_score(self.id_logits, temperature=0.0)

    def test_msp_accepts_tensors(self):
        tensor_scores = ood.msp_score(torch.from_numpy(self.id_logits))
        np.testing.assert_allclose(tensor_scores, ood.msp_score(self.id_logits))


class TestNeco:
    def setup_method(self):
        rng = np.random.default_rng(9)
        basis, _ = np.linalg.qr(rng.normal(size=(32, 4)))
        offset = rng.normal(size=32) * 5.0

        def in_distribution(count):
            return offset + rng.normal(size=(count, 4)) * 3.0 @ basis.T + 0.05 * rng.normal(size=(count, 32))

        self.train = in_distribution(500)
        self.id_test = in_distribution(200)
        self.ood_test = offset + rng.normal(size=(200, 32))
        self.id_logits = np.abs(rng.normal(size=(200, 3))) + 1.0
        self.ood_logits = np.abs(rng.normal(size=(200, 3))) + 1.0

    def test_variance_share_selects_rank(self):
        scorer = ood.NecoScorer(n_components=0.9).fit(self.train)
        assert scorer.k_ == 4

    def test_ood_scores_higher(self):
        scorer = ood.NecoScorer(n_components=4, use_max_logit=False).fit(self.train)
        id_scores = scorer.score(self.id_test)
        ood_scores = scorer.score(self.ood_test)
        # Without the max logit the score is the negated ratio, in [-1, 0].
        assert np.all((id_scores >= -1.0 - 1e-9) & (id_scores <= 0.0))
        assert id_scores.mean() < -0.9
        assert ood.ood_detection_metrics(id_scores, ood_scores)["auroc"] > 0.99

    def test_max_logit_variant(self):
        scorer = ood.NecoScorer(n_components=4, use_max_logit=True).fit(self.train)
        id_scores = scorer.score(self.id_test, self.id_logits)
        ratio_only = ood.NecoScorer(n_components=4, use_max_logit=False).fit(self.train).score(self.id_test)
        np.testing.assert_allclose(id_scores, ratio_only * self.id_logits.max(axis=1))
        ood_scores = scorer.score(self.ood_test, self.ood_logits)
        assert ood.ood_detection_metrics(id_scores, ood_scores)["auroc"] > 0.9

    def test_errors(self):
        with pytest.raises(RuntimeError, match="fit"):
            ood.NecoScorer().score(self.id_test)
        with pytest.raises(ValueError, match="`n_components`"):
            ood.NecoScorer(n_components=0).fit(self.train)
        with pytest.raises(ValueError, match="`n_components`"):
            ood.NecoScorer(n_components=1.5).fit(self.train)
        scorer = ood.NecoScorer(n_components=4, use_max_logit=True).fit(self.train)
        with pytest.raises(ValueError, match="`logits` is required"):
            scorer.score(self.id_test)
        with pytest.raises(ValueError, match="fitted on 32"):
            scorer.score(self.id_test[:, :8], self.id_logits)


class TestEvaluateOodDetection:
    def test_all_scores(self):
        rng = np.random.default_rng(10)
        id_logits = rng.normal(size=(50, 4))
        id_logits[:, 0] += 5.0
        ood_logits = rng.normal(size=(40, 4))
        results = ood.evaluate_ood_detection(
            id_logits,
            ood_logits,
            in_distribution_features=rng.normal(size=(50, 8)),
            ood_features=rng.normal(size=(40, 8)),
            train_features=rng.normal(size=(100, 8)),
            neco_components=3,
        )
        assert set(results) == {"msp", "energy", "neco", "neco_max_logit"}
        assert results["msp"]["auroc"] > 0.95
        assert set(results["neco"]) == {"auroc", "fpr_at_95_tpr"}

    def test_neco_variants_match_scorer(self):
        rng = np.random.default_rng(17)
        train, id_features, ood_features = (rng.normal(size=(n, 8)) for n in (100, 50, 40))
        id_logits = np.abs(rng.normal(size=(50, 3)))
        ood_logits = np.abs(rng.normal(size=(40, 3)))
        results = ood.evaluate_ood_detection(
            id_logits,
            ood_logits,
            in_distribution_features=id_features,
            ood_features=ood_features,
            train_features=train,
            neco_components=3,
        )
        ratio = ood.NecoScorer(n_components=3).fit(train)
        with_logit = ood.NecoScorer(n_components=3, use_max_logit=True).fit(train)
        assert results["neco"] == ood.ood_detection_metrics(ratio.score(id_features), ratio.score(ood_features))
        assert results["neco_max_logit"] == ood.ood_detection_metrics(
            with_logit.score(id_features, id_logits), with_logit.score(ood_features, ood_logits)
        )

    def test_logits_only(self):
        rng = np.random.default_rng(11)
        results = ood.evaluate_ood_detection(rng.normal(size=(30, 3)), rng.normal(size=(30, 3)))
        assert set(results) == {"msp", "energy"}

    def test_partial_features(self):
        rng = np.random.default_rng(12)
        with pytest.raises(ValueError, match="all three or none"):
            ood.evaluate_ood_detection(
                rng.normal(size=(30, 3)), rng.normal(size=(30, 3)), in_distribution_features=rng.normal(size=(30, 8))
            )


# --------------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------------


class TestCompression:
    @pytest.mark.parametrize("probe", ["ridge", "logistic"])
    def test_low_rank_smallest_k(self, probe):
        rng = np.random.default_rng(13)
        rank = 5
        features, labels = low_rank_classes(rng, rank, 48, 1000)
        curve = ood.compression_curve(
            features[:700], labels[:700], features[700:], labels[700:], ks=range(1, 49), probe=probe
        )
        assert curve.probe == probe
        assert curve.full_accuracy > 0.97
        assert curve.smallest_k == rank
        # k = rank - 1 merges the two classes of the weakest axis.
        assert curve.accuracies[rank - 2] < 0.95
        assert curve.accuracies[-1] == curve.full_accuracy
        assert curve.feature_dim == 48

    def test_default_grid(self):
        rng = np.random.default_rng(14)
        features, labels = low_rank_classes(rng, 3, 40, 400)
        curve = ood.compression_curve(features[:300], labels[:300], features[300:], labels[300:])
        assert curve.ks == ood.default_k_grid(40)
        assert curve.smallest_k == 3
        assert set(curve.to_dict()) == {"ks", "accuracies", "full_accuracy", "smallest_k", "fraction", "feature_dim", "probe"}

    def test_k_grid_values(self):
        assert ood.default_k_grid(384) == list(range(1, 17)) + [23, 32, 45, 64, 91, 128, 181, 256, 362, 384]
        assert ood.default_k_grid(10) == list(range(1, 11))
        assert ood.default_k_grid(17) == list(range(1, 18))

    def test_bad_ks(self):
        rng = np.random.default_rng(15)
        features, labels = low_rank_classes(rng, 2, 8, 100)
        with pytest.raises(ValueError, match=r"\[1, 8\]"):
            ood.compression_curve(features, labels, features, labels, ks=[0, 4])
        with pytest.raises(ValueError, match=r"\[1, 8\]"):
            ood.compression_curve(features, labels, features, labels, ks=[9])
        with pytest.raises(ValueError, match="`fraction`"):
            ood.compression_curve(features, labels, features, labels, fraction=0.0)
        with pytest.raises(ValueError, match="'lasso'"):
            ood.compression_curve(features, labels, features, labels, probe="lasso")


# --------------------------------------------------------------------------------------------------
# Rank sensitivity
# --------------------------------------------------------------------------------------------------


class TestRankSensitivity:
    def setup_method(self):
        rng = np.random.default_rng(16)
        basis, _ = np.linalg.qr(rng.normal(size=(32, 4)))
        # Rank-4 signal with singular values ~ sqrt(N), noise ~1e-3 of that: rank 4 at tolerance 1e-2
        # and full rank at 1e-4.
        self.features = rng.normal(size=(400, 4)) @ basis.T + 1e-3 * rng.normal(size=(400, 32))

    def test_rank_by_tolerance(self):
        rows = ood.rank_sensitivity(self.features, sample_counts=[400])
        ranks = {row.tolerance: row.numerical_rank for row in rows}
        assert ranks[1e-2] == 4
        assert ranks[1e-4] == 32
        assert 4 <= ranks[1e-3] <= 32
        assert all(3.0 < row.effective_rank < 6.0 for row in rows)

    def test_small_sample_counts(self):
        rows = ood.rank_sensitivity(self.features, sample_counts=[3, 100], tolerances=[1e-2], repeats=2)
        # Three centred rows span at most two directions.
        assert [(row.sample_count, row.repeat, row.numerical_rank) for row in rows] == [(3, 0, 2), (3, 1, 2), (100, 0, 4), (100, 1, 4)]

    def test_defaults_and_determinism(self):
        rows = ood.rank_sensitivity(self.features, repeats=3, seed=1)
        again = ood.rank_sensitivity(self.features, repeats=3, seed=1)
        assert [row.to_dict() for row in rows] == [row.to_dict() for row in again]
        # No default count is below N = 400, so only the full set is measured, once per tolerance.
        assert [(row.sample_count, row.repeat) for row in rows] == [(400, 0)] * 3
        assert [row.tolerance for row in rows] == [1e-2, 1e-3, 1e-4]

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match=r"\[2, 400\]"):
            ood.rank_sensitivity(self.features, sample_counts=[401])
        with pytest.raises(ValueError, match="tolerance"):
            ood.rank_sensitivity(self.features, tolerances=[1.5])
        with pytest.raises(ValueError, match="`tolerances` is empty"):
            ood.rank_sensitivity(self.features, tolerances=[])
        with pytest.raises(ValueError, match="`repeats`"):
            ood.rank_sensitivity(self.features, repeats=0)


# --------------------------------------------------------------------------------------------------
# Confidence intervals
# --------------------------------------------------------------------------------------------------


class TestConfidenceInterval:
    def test_known_values(self):
        # s = 1, n = 3, t_{0.975, 2} = 4.302653: half width 4.302653 / sqrt(3).
        interval = ood.mean_confidence_interval([1.0, 2.0, 3.0])
        assert interval.mean == pytest.approx(2.0)
        assert interval.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
        assert interval.lower == pytest.approx(2.0 - interval.half_width)
        assert interval.upper == pytest.approx(2.0 + interval.half_width)
        assert interval.count == 3

    def test_other_confidence(self):
        # t_{0.95, 4} = 2.131847, s of 2, 4, 4, 4, 6 is sqrt(2).
        interval = ood.mean_confidence_interval(np.array([2.0, 4.0, 4.0, 4.0, 6.0]), confidence=0.9)
        assert interval.half_width == pytest.approx(2.131847 * math.sqrt(2) / math.sqrt(5), rel=1e-6)

    def test_single_and_identical_values(self):
        single = ood.mean_confidence_interval([0.7])
        assert single.mean == 0.7
        assert math.isnan(single.half_width)
        identical = ood.mean_confidence_interval(torch.tensor([0.5, 0.5, 0.5]))
        assert identical.half_width == 0.0
        assert identical.lower == identical.upper == 0.5

    def test_bad_values(self):
        with pytest.raises(ValueError, match="non-empty `values`"):
            ood.mean_confidence_interval([])
        with pytest.raises(ValueError, match="finite `values`"):
            ood.mean_confidence_interval([1.0, float("nan")])
        with pytest.raises(ValueError, match="`confidence`"):
            ood.mean_confidence_interval([1.0, 2.0], confidence=95)
