"""recurrent: the LSTM beats the tanh RNN at T=50; dL/dh_t is measured per time step."""

from __future__ import annotations

from gradprobe.lab.experiment import pick, row_of


def test_lstm_beats_rnn_at_50(lab_tiny):
    o = lab_tiny("recurrent")
    rnn = row_of(o.table, kind="rnn", length=50, forget="default")
    lstm = row_of(o.table, kind="lstm", length=50, forget="default")
    assert lstm["val_mse"] < rnn["val_mse"]
    assert lstm["mse_over_baseline"] < 0.5
    grads = pick(o.results, kind="rnn", forget="default").series["grad_init"]
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


def test_forget_bias_memory_measured_beside_predicted(lab_tiny):
    import math

    from gradprobe import theory

    o = lab_tiny("recurrent")
    rows = {
        f: row_of(o.table, kind="lstm", length=50, forget=f)
        for f in ("default", "0", "1", "chrono")
    }
    for f, r in rows.items():
        # the Probe's memory within 15 % of −1/E[log σ(b_f + s·z)] (see MEMORY_RTOL)
        assert abs(r["memory_measured"] / r["memory_predicted"] - 1) <= 0.15, f
    assert rows["1"]["memory_characteristic"] == theory.gated_memory(1.0)
    assert (
        rows["0"]["memory_measured"]
        < rows["1"]["memory_measured"]
        < rows["chrono"]["memory_measured"]
    )
    # in tiny mode the variants are not trained: no MSE, and the verdict says so
    assert math.isnan(rows["chrono"]["val_mse"])
    assert "not trained in this mode" in o.verdict.text
    assert [c.held for c in o.verdict.checks[3:]] == [(True,), (True,)]
