"""output_error: E‖ΔW x‖² from the Hessian, its diagonal, or the inputs themselves — one number, one unit."""

import pytest
import torch

import prism_convert.compression.math.measure as measure
from prism_convert.compression.math.measure import output_error, relative_output_error
from prism_load.errors import EncodingError


@pytest.fixture
def case():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(300, 40, generator=gen) @ torch.randn(40, 40, generator=gen)  # [N, I] correlated inputs
    w = torch.randn(24, 40, generator=gen)
    w_hat = w + 0.01 * torch.randn(24, 40, generator=gen)
    return w, w_hat, x, x.T @ x / len(x)


def test_hessian_form_is_the_mean_squared_output_error(case, monkeypatch):
    w, w_hat, x, h = case
    direct = float(((x.double() @ (w - w_hat).double().T) ** 2).sum(1).mean())  # mean_n ‖ΔW x_n‖²
    assert output_error(w, w_hat, hessian=h) == pytest.approx(direct, rel=1e-5)
    assert output_error(w, w_hat, inputs=x) == pytest.approx(direct, rel=1e-5)
    monkeypatch.setattr(measure, "ROW_CHUNK_ELEMENTS", 40 * 5)  # row chunks: same number
    assert output_error(w, w_hat, hessian=h) == pytest.approx(direct, rel=1e-5)


def test_diagonal_estimate_and_plain(case):
    w, w_hat, _, h = case
    m = h.diagonal()
    d = (w - w_hat).double()
    assert output_error(w, w_hat, channel_weights=m) == pytest.approx(float((d**2 * m.double()).sum()), rel=1e-6)
    assert output_error(w, w_hat, channel_weights=m) == pytest.approx(output_error(w, w_hat, hessian=torch.diag(m)), rel=1e-5)
    assert output_error(w, w_hat) == pytest.approx(float((d**2).sum()), rel=1e-6)
    assert output_error(w, w) == 0.0


def test_relative_error_is_a_share_of_the_output(case):
    w, w_hat, _, h = case
    assert relative_output_error(w, torch.zeros_like(w), hessian=h) == pytest.approx(1.0)
    rel = relative_output_error(w, w_hat, hessian=h)
    assert 0 < rel < 1e-3


def test_bad_statistics(case):
    w, w_hat, x, h = case
    with pytest.raises(EncodingError, match=r"Hessian of shape \[39, 39\] does not match 40"):
        output_error(w, w_hat, hessian=h[:39, :39])
    with pytest.raises(EncodingError, match=r"channel weights of shape \[3\]"):
        output_error(w, w_hat, channel_weights=torch.ones(3))
    with pytest.raises(EncodingError, match=r"inputs of shape \[300, 39\]"):
        output_error(w, w_hat, inputs=x[:, :39])
    with pytest.raises(EncodingError, match="one of hessian, channel_weights, inputs"):
        output_error(w, w_hat, hessian=h, inputs=x)
    with pytest.raises(EncodingError, match=r"decoded shape \[24, 39\]"):
        output_error(w, w_hat[:, :39])
