"""The shipped data sets: fixed stratified splits, standardisation by the training split,
batches under jit, and refusals naming the argument."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gaugejax as gj


def test_digits_split_is_fixed_stratified_and_standardised():
    data = gj.load_dataset("digits")
    assert data.x_train.shape == (1347, 64) and data.x_test.shape == (450, 64)
    assert data.num_classes == 10 and data.x_train.dtype == jnp.float64
    train, test = np.asarray(data.train_index), np.asarray(data.test_index)
    assert not set(train) & set(test) and len(set(train) | set(test)) == 1797
    # the same seed gives the same split and values; another seed another split
    again, other = gj.load_dataset("digits"), gj.load_dataset("digits", seed=1)
    np.testing.assert_array_equal(again.train_index, data.train_index)
    np.testing.assert_array_equal(again.x_test, data.x_test)
    assert not np.array_equal(other.train_index, data.train_index)
    # standardised by the training split: mean 0 and std 1 per non-constant pixel (1e-12:
    # float64 sums of 1347 values of size ~1); the test split is not exactly standard
    varies = np.asarray(data.std) != 1.0
    x = np.asarray(data.x_train)
    assert np.abs(x.mean(0)).max() < 1e-12
    np.testing.assert_allclose(x.std(0)[varies], 1.0, rtol=1e-12)
    assert np.abs(np.asarray(data.x_test).mean(0)).max() > 1e-3
    # stratified: each class's share of the test split within one example of its share overall
    counts = np.bincount(np.asarray(data.y_test), minlength=10)
    share = np.bincount(np.concatenate([np.asarray(data.y_train), np.asarray(data.y_test)]))
    assert np.all(np.abs(counts - share * 450 / 1797) <= 1.0)
    # the raw pixels are recovered from the standardisation (0..16 grey levels)
    raw = np.asarray(data.x_train * data.std + data.mean)
    np.testing.assert_allclose(raw, np.round(raw), atol=1e-12)
    assert np.round(raw).min() == 0 and np.round(raw).max() == 16


@pytest.mark.parametrize("name", ["moons", "circles"])
def test_generated_sets_and_batches(name):
    data = gj.load_dataset(name, num_samples=200, noise=0.05)
    assert data.x_train.shape == (150, 2) and data.num_classes == 2
    assert sorted(np.unique(np.asarray(data.y_train))) == [0, 1]
    fn = data.batch_fn(32)
    x, y = eqx.filter_jit(fn)(jax.random.key(3))  # the data are arguments, not constants
    assert x.shape == (32, 2) and y.shape == (32,)
    # every batch row is a training example with its label
    xs, ys = np.asarray(data.x_train), np.asarray(data.y_train)
    rows = {tuple(r): int(lab) for r, lab in zip(xs, ys, strict=True)}
    assert all(rows[tuple(r)] == int(lab) for r, lab in zip(np.asarray(x), y, strict=True))
    x2, _ = fn(jax.random.key(4))
    assert not np.array_equal(x, x2)


def test_bad_input_names_the_argument_and_the_valid_values():
    with pytest.raises(
        ValueError, match=r"unknown data set 'mnist'.*\['digits', 'moons', 'circles'\]"
    ):
        gj.load_dataset("mnist")
    with pytest.raises(ValueError, match=r"`test_fraction` must be in \(0, 1\); received 1.0"):
        gj.load_dataset("moons", test_fraction=1.0)
    with pytest.raises(ValueError, match="`num_samples` must be an int >= 8; received 4"):
        gj.load_dataset("moons", num_samples=4)
    with pytest.raises(ValueError, match="`noise` must be a finite number >= 0; received -0.1"):
        gj.load_dataset("circles", noise=-0.1)
    data = gj.load_dataset("moons", num_samples=16)
    with pytest.raises(ValueError, match="`batch_size` must be a positive int; received 0"):
        data.batch_fn(0)


def test_classification_losses_and_their_refusals():
    """Cross-entropy and accuracy of logits against closed forms, and the model-on-a-batch loss
    `gj.train` takes; shapes that do not match are refused by name."""
    labels = jnp.array([0, 1, 2, 1])
    flat = jnp.zeros((4, 3))
    # uniform logits: log(3) per example (rounding only)
    np.testing.assert_allclose(gj.cross_entropy(flat, labels), np.log(3.0), rtol=1e-15)
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert float(gj.accuracy(logits, labels)) == 0.5  # rows 0 and 1 right, 2 and 3 wrong
    rows = np.asarray(logits)
    expected = np.mean(np.log(np.sum(np.exp(rows), axis=1)) - rows[np.arange(4), [0, 1, 2, 1]])
    np.testing.assert_allclose(gj.cross_entropy(logits, labels), expected, rtol=1e-14)
    model = lambda x: jnp.stack([x[0], -x[0]])  # noqa: E731
    x = jnp.array([[1.0], [-2.0]])
    y = jnp.array([0, 0])
    np.testing.assert_allclose(
        gj.classification_loss(model, (x, y)),
        gj.cross_entropy(jnp.array([[1.0, -1.0], [-2.0, 2.0]]), y),
        rtol=1e-15,
    )
    # refused by the annotations when type-checked (as here), else by the function itself
    with pytest.raises(TypeError, match="labels"):
        gj.cross_entropy(flat, labels[:3])
    with pytest.raises(TypeError, match="logits"):
        gj.accuracy(jnp.zeros(3), labels[:3])
