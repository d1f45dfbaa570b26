import numpy as np
import pytest

from serve.offline.classifier_router import LinearExpertClassifier


def test_linear_classifier_learns_separable_domains(rng):
    centers = rng.normal(size=(3, 16)) * 3
    x = np.concatenate([c + rng.normal(size=(40, 16)) * 0.3 for c in centers])
    y = ["a"] * 40 + ["b"] * 40 + ["c"] * 40
    clf = LinearExpertClassifier.fit(x, y, epochs=200)
    test = np.concatenate([c + rng.normal(size=(10, 16)) * 0.3 for c in centers])
    assert clf.predict(test) == ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    with pytest.raises(ValueError, match="at least 2"):
        LinearExpertClassifier.fit(x[:5], ["a"] * 5)
