"""Real data, shipped: scikit-learn's digits (8x8 images, in the package, no download) and two
generated 2-D tasks (moons, circles), with fixed stratified train/test splits and features
standardised by the training split's statistics.

scikit-learn does the work it already does well (the data sets, `train_test_split`,
`StandardScaler`); it is imported only when a data set is loaded. The classification losses and
metrics every experiment uses live here too: `cross_entropy`, `accuracy` (of logits) and
`classification_loss` (of a model on a batch, the loss `gj.train` takes).
"""

import functools
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray


DATASETS = ("digits", "moons", "circles")


class Dataset(eqx.Module):
    """A classification data set with a fixed train/test split.

    **Fields:** `name`; `x_train` `(n, d)` and `x_test` `(m, d)` standardised by the training
    split's mean and standard deviation (`mean`, `std`: features constant on the training split
    keep scale 1, as in `sklearn.preprocessing.StandardScaler`); integer labels `y_train`,
    `y_test`; `num_classes`; `train_index`, `test_index`: the rows of the raw data set in each
    split (disjoint; a reader can recover the raw examples).
    """

    name: str = eqx.field(static=True)
    x_train: Float[Array, "n d"]
    y_train: Int[Array, " n"]
    x_test: Float[Array, "m d"]
    y_test: Int[Array, " m"]
    mean: Float[Array, " d"]
    std: Float[Array, " d"]
    num_classes: int = eqx.field(static=True)
    train_index: Int[Array, " n"]
    test_index: Int[Array, " m"]

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    def batch(self, key: PRNGKeyArray, batch_size: int) -> tuple[Array, Array]:
        """`(x, y)`: `batch_size` training examples drawn uniformly with replacement (a fixed
        shape under `jit`; with `gj.train`'s `fold_in(key, step)` keys, a resumed run draws the
        same batches).

        **Raises:** `ValueError` for a `batch_size` that is not a positive int.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int; received {batch_size!r}.")
        idx = jax.random.randint(key, (batch_size,), 0, self.y_train.shape[0])
        return self.x_train[idx], self.y_train[idx]

    def batch_fn(self, batch_size: int) -> Callable[[PRNGKeyArray], tuple[Array, Array]]:
        """`key -> self.batch(key, batch_size)`, the `batch_fn` of `gj.train`."""
        # validates now, not inside a trace (abstractly: no program compiled for it)
        jax.eval_shape(functools.partial(self.batch, batch_size=batch_size), jax.random.key(0))
        return _BatchFn(self, batch_size)


class _BatchFn(eqx.Module):
    """A Module, not a closure: runs that share the data set and batch size share a program."""

    data: Dataset
    batch_size: int = eqx.field(static=True)

    def __call__(self, key):
        return self.data.batch(key, self.batch_size)


def cross_entropy(logits: Float[Array, "n k"], labels: Int[Array, " n"]) -> Float[Array, ""]:
    """Mean softmax cross-entropy of `logits` against integer `labels` (optax's, averaged).

    **Raises:** `TypeError` for logits that are not `(n, k)` or `labels` that are not `(n,)`.
    """
    _check_logits(logits, labels)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: Float[Array, "n k"], labels: Int[Array, " n"]) -> Float[Array, ""]:
    """The fraction of rows whose largest logit is at the label (in the logits' dtype).

    **Raises:** `TypeError` for logits that are not `(n, k)` or `labels` that are not `(n,)`.
    """
    _check_logits(logits, labels)
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype))


def classification_loss(model: Callable, batch: tuple[Array, Array]) -> Float[Array, ""]:
    """`cross_entropy(vmap(model)(x), y)` for a batch `(x, y)`: the loss of a classifier that
    maps one example to its logits, as `gj.train` (and `gj.teleport`) take it. A function, not
    a closure: runs that use it share their compiled programs."""
    x, y = batch
    return cross_entropy(jax.vmap(model)(x), y)


def _check_logits(logits, labels) -> None:
    if jnp.ndim(logits) != 2 or jnp.shape(labels) != jnp.shape(logits)[:1]:
        raise TypeError(
            f"expected `logits` (n, k) and integer `labels` (n,); received shapes "
            f"{jnp.shape(logits)} and {jnp.shape(labels)}."
        )


def _raw(name: str, num_samples: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import sklearn.datasets

    if name == "digits":
        bunch = sklearn.datasets.load_digits()
        return bunch.data.astype(np.float64), bunch.target.astype(np.int64)
    if name == "moons":
        x, y = sklearn.datasets.make_moons(num_samples, noise=noise, random_state=seed)
    else:
        x, y = sklearn.datasets.make_circles(
            num_samples, noise=noise, factor=0.5, random_state=seed
        )
    return x.astype(np.float64), y.astype(np.int64)


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.25,
    num_samples: int = 1000,
    noise: float = 0.1,
) -> Dataset:
    """One of `DATASETS`, split and standardised.

    **Arguments:**

    - `name`: `"digits"` (1797 8x8 grey-level images, 64 features, 10 classes; shipped with
      scikit-learn), `"moons"` or `"circles"` (2-D, 2 classes, generated by scikit-learn).
    - `seed`: fixes the split (stratified by class) and, for the generated sets, the samples.
    - `test_fraction`: the share of examples held out, in (0, 1).
    - `num_samples`, `noise`: size and label-noise scale of the generated sets (ignored for
      digits).

    **Returns:** a `Dataset` in JAX's default float dtype (float64 with x64 on).

    **Raises:** `ValueError` for an unknown name (listing the valid ones), a `test_fraction`
    outside (0, 1), a `num_samples` below 8, a negative or non-finite `noise` (before anything
    is loaded), or a `noise` so large that the standardised features overflow.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid data sets are {list(DATASETS)}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be an int >= 0; received {seed!r}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1); received {test_fraction!r}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 8:
        raise ValueError(f"`num_samples` must be an int >= 8; received {num_samples!r}.")
    if not 0 <= noise < math.inf:
        raise ValueError(f"`noise` must be a finite number >= 0; received {noise!r}.")
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = _raw(name, num_samples, float(noise), seed)
    index = np.arange(len(y))
    train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=y)
    # a variance that overflows is refused below with its reason, so numpy's own overflow
    # warnings from inside scikit-learn would only say the same thing less clearly
    with np.errstate(over="ignore", invalid="ignore"):
        scaler = StandardScaler().fit(x[train])
        standardised = scaler.transform(x)
    if not np.all(np.isfinite(standardised)):  # the variance overflowed
        raise ValueError(
            f"`noise` must keep the standardised features finite; received {noise!r}, whose "
            "samples overflow the variance (noise of order 1 is the generated sets' scale)."
        )
    dtype = jnp.zeros(()).dtype
    as_x = lambda a: jnp.asarray(a, dtype=dtype)  # noqa: E731
    return Dataset(
        name=name,
        x_train=as_x(scaler.transform(x[train])),
        y_train=jnp.asarray(y[train]),
        x_test=as_x(scaler.transform(x[test])),
        y_test=jnp.asarray(y[test]),
        mean=as_x(scaler.mean_),
        std=as_x(scaler.scale_),
        num_classes=int(y.max()) + 1,
        train_index=jnp.asarray(train),
        test_index=jnp.asarray(test),
    )
