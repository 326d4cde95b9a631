"""laic.assignment: cluster probabilities to what a user gets, against values worked out by hand."""
import numpy as np

from laic.assignment import labels_of, without_empty_clusters


def test_without_empty_clusters_renormalises_and_never_divides_by_zero():
    probs = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [np.nan] * 3, [0.1, 0.9, 0.0]], dtype=np.float32)
    got = without_empty_clusters(probs, [0, 3, 4])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[0], [0, 0.3 / 0.8, 0.5 / 0.8], rtol=1e-6)
    np.testing.assert_array_equal(got[1], [0, 0.5, 0.5])      # all its mass on the empty cluster: the others alike
    assert np.isnan(got[2]).all()                              # an unreadable image stays NaN
    np.testing.assert_array_equal(got[3], [0, 1, 0])
    assert without_empty_clusters(probs, [1, 3, 4]) is probs   # nothing empty: untouched


def test_labels_of_takes_the_argmax_and_gives_nan_rows_minus_one():
    probs = np.array([[0.2, 0.3, 0.5], [np.nan, 0.5, 0.5], [0.6, 0.4, 0.0], [np.nan] * 3], dtype=np.float32)
    labels = labels_of(probs)
    assert labels.dtype == np.int64 and labels.tolist() == [2, -1, 0, -1]
