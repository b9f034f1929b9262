"""The paper's Table-1 scalar forms (landscape plots only) and the reason they are not trained."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.test_util import check_grads

from dpok_jax.losses import paper_forms


def test_values_match_numpy(x64):
    z = np.linspace(-4, 4, 17)
    np.testing.assert_allclose(paper_forms.polynomial(z, c=1.5, degree=3), (z + 1.5) ** 3, rtol=1e-12)
    np.testing.assert_allclose(paper_forms.rbf(z, sigma=0.7), np.exp(-z**2 / (2 * 0.49)), rtol=1e-12)
    np.testing.assert_allclose(paper_forms.mahalanobis(z, mu=0.5, var=2.0),
                               np.exp(-(z - 0.5) ** 2 / 4.0), rtol=1e-12)
    lam, om = (0.3, 1.2), (0.5, 2.0)
    want = sum(np.exp(-lv * z**2) * np.cos(o * z) for lv, o in zip(lam, om))
    np.testing.assert_allclose(paper_forms.spectral(z, lambdas=lam, freqs=om), want, rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(paper_forms.paper_form("rbf", z, sigma=0.7),
                               paper_forms.rbf(z, sigma=0.7), rtol=0)


def test_maximizing_the_scalar_forms_erases_or_reverses_the_preference(x64):
    """SPEC §5: ascent on exp(−z²/2σ²) moves every margin toward 0; (z + c)^2 rewards z → −∞."""
    z = np.array([-5.0, -1.0, -0.1, 0.1, 1.0, 5.0])
    for name, params in (("rbf", {"sigma": 1.3}), ("mahalanobis", {}), ("spectral", {})):
        g = paper_forms.ascent_direction(name, z, **params)
        near = np.abs(z) <= 1.0  # the spectral cosines can turn the sign far from 0
        assert np.all(np.sign(g[near]) == -np.sign(z[near])), name
    np.testing.assert_allclose(paper_forms.ascent_direction("rbf", z, sigma=1.3),
                               -z / 1.69 * np.exp(-z**2 / (2 * 1.69)), rtol=1e-12)
    g = paper_forms.ascent_direction("polynomial", z, c=1.0, degree=2)
    np.testing.assert_allclose(g, 2 * (z + 1.0), rtol=1e-12)
    assert np.all(g[z < -1.0] < 0)  # below −c ascent pushes z further toward the rejected response


@pytest.mark.parametrize("name", paper_forms.FORMS)
def test_grads(x64, name):
    z = np.array([-1.3, 0.2, 2.1])
    check_grads(jax.jit(lambda t: paper_forms.paper_form(name, t)), (z,), order=2,
                modes=("fwd", "rev"))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown paper form"):
        paper_forms.paper_form("laplace", 0.0)
    with pytest.raises(ValueError, match="degree"):
        paper_forms.polynomial(0.0, degree=2.5)
    with pytest.raises(ValueError, match="sigma"):
        paper_forms.rbf(0.0, sigma=0.0)
    with pytest.raises(ValueError, match="var"):
        paper_forms.mahalanobis(0.0, var=-1.0)
    with pytest.raises(ValueError, match="lambdas"):
        paper_forms.spectral(0.0, lambdas=(1.0,), freqs=(1.0, 2.0))
    with pytest.raises(ValueError, match="lambdas"):
        paper_forms.spectral(0.0, lambdas=(1.0, -1.0), freqs=(1.0, 2.0))


def test_module_docstring_says_why_not_trainable():
    doc = paper_forms.__doc__
    assert "not trainable" in doc and "erases" in doc and "embedding" in doc
