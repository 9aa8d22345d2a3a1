"""recurrent: the LSTM beats the tanh RNN at T=50; dL/dh_t is measured per time step."""

from __future__ import annotations

from gradprobe.lab.experiment import pick, row_of


def test_lstm_beats_rnn_at_50(lab_tiny):
    o = lab_tiny("recurrent")
    rnn = row_of(o.table, kind="rnn", length=50)
    lstm = row_of(o.table, kind="lstm", length=50)
    assert lstm["val_mse"] < rnn["val_mse"]
    assert lstm["mse_over_baseline"] < 0.5
    grads = pick(o.results, kind="rnn").series["grad_init"]
    assert len(grads) == 50 and all(g >= 0 for g in grads)
    assert o.verdict.checks[0].held == (True,)


def test_unrolled_gradients_match_autograd():
    import torch

    from gradprobe.lab import models
    from gradprobe.lab.recurrent import hidden_grad_norms

    torch.manual_seed(0)
    model = models.recurrent("rnn", hidden=8)
    x, y = torch.randn(4, 6, 2), torch.randn(4, 1)
    norms = hidden_grad_norms(model, x, y)
    # The last step's gradient is the head's weight times the loss gradient, by hand.
    pred = model(x)
    d_pred = 2 * (pred - y) / pred.numel()
    expected = (d_pred @ model.head.weight).norm()
    assert abs(norms[-1] - float(expected.detach())) < 1e-5
