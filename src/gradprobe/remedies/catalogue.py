"""The remedy catalogue (docs/concepts.md §4) as plain data: :class:`Remedy` and :data:`REMEDIES`.

A :class:`Remedy` says what a fix *is* (``why``, a ``code`` hint), which findings it
addresses and how directly (``treats``: finding kind → strength in [0, 1]), and what
makes it fit the model in front of us: the architecture (``architectures``: a bonus,
or ``None`` where it does not apply), the activations it is the cure for
(``suits_activations``), and the signs that it is already in place (``present_when``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

_SATURATING = ("sigmoid", "tanh", "softsign", "hardtanh")
_RELU_FAMILY = ("relu", "leaky_relu", "prelu", "elu")


@dataclass(frozen=True)
class Remedy:
    """One fix from the catalogue: what it is, why it helps, when it applies."""

    key: str
    name: str
    why: str
    code: str
    treats: Mapping[str, float] = field(default_factory=dict)
    architectures: Mapping[str, float | None] = field(default_factory=dict)
    suits_activations: tuple[str, ...] = ()
    present_when: tuple[str, ...] = ()
    then: tuple[str, ...] = ()  # remedies that go with it (ReLU → He init)
    risk: str = ""
    # It changes something only some models have (a forget gate, a residual branch,
    # Adam's moments): at least one of these tokens must be in the model's profile.
    requires: tuple[str, ...] = ()
    cite: str = ""

    def applies_to(self, architecture: str) -> bool:
        return self.architectures.get(architecture, 0.0) is not None


REMEDIES: dict[str, Remedy] = {
    r.key: r
    for r in [
        Remedy(
            "relu",
            "ReLU activation (with He init)",
            "its derivative is 1 for z > 0, so the error signal is not multiplied by "
            "σ' ≤ 0.25 at every layer and does not saturate for positive inputs",
            "act = nn.ReLU()  # in place of nn.Sigmoid() / nn.Tanh()\n"
            "nn.init.kaiming_normal_(layer.weight, nonlinearity='relu')",
            treats={"vanishing": 1.0, "saturation": 1.0, "stalled": 0.5},
            # Transformers use GELU/SiLU MLPs behind LayerNorm; their gradient problems
            # come from depth, norms and the step size, not from the MLP's activation.
            architectures={"rnn": -0.8, "transformer": None},
            suits_activations=_SATURATING,
            present_when=("relu",),
            then=("he_init",),
            risk="dead units that output 0 for every input",
        ),
        Remedy(
            "leaky_relu",
            "Leaky ReLU, PReLU or ELU",
            "a non-zero slope for z < 0 keeps a gradient flowing through units that a "
            "ReLU would have killed",
            "act = nn.LeakyReLU(0.01)  # or nn.PReLU(), nn.ELU(); in place of nn.ReLU()",
            treats={"dead_units": 1.0, "dead_channels": 1.0, "vanishing": 0.5, "saturation": 0.6},
            # Transformers' MLPs use GELU/SiLU, which do not die; their problems are elsewhere.
            architectures={"transformer": None},
            suits_activations=("relu",),
            present_when=("leaky_relu", "prelu", "elu"),
            risk="one more hyper-parameter (the slope)",
        ),
        Remedy(
            "silu_gelu",
            "SiLU/Swish or GELU",
            "smooth activations with a non-zero gradient almost everywhere, used in "
            "modern CNNs (SiLU) and Transformers (GELU)",
            "act = nn.SiLU()  # or nn.GELU(); in place of the hidden activation",
            treats={"vanishing": 0.4, "saturation": 0.5, "dead_units": 0.6, "dead_channels": 0.6},
            architectures={"transformer": 0.3, "cnn": 0.2},
            present_when=("silu", "gelu"),
            risk="more compute per activation",
        ),
        Remedy(
            "softmax",
            "Softmax output layer",
            "turns the last layer's scores into class probabilities; it belongs on the "
            "output of a multi-class classifier only and fixes no hidden-layer problem",
            "loss_fn = nn.CrossEntropyLoss()  # on raw logits: it applies log-softmax itself",
            treats={},
        ),
        Remedy(
            "xavier_init",
            "Xavier/Glorot initialisation",
            "Var(W) = 2/(fan_in + fan_out) keeps the variance of activations and of the "
            "error signal about constant across layers for tanh-like activations",
            "nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain('tanh')); "
            "nn.init.zeros_(layer.bias)",
            treats={"vanishing": 0.5, "exploding": 0.7, "saturation": 0.6},
            suits_activations=("tanh", "softsign"),
            present_when=("init:xavier_uniform", "init:xavier_normal"),
        ),
        Remedy(
            "he_init",
            "He/Kaiming initialisation",
            "Var(W) = 2/fan_in makes up for ReLU zeroing half of its inputs, so the "
            "signal keeps its scale in both directions through deep ReLU stacks",
            "nn.init.kaiming_normal_(layer.weight, nonlinearity='relu'); nn.init.zeros_(layer.bias)",
            treats={"vanishing": 0.6, "exploding": 0.6, "dead_units": 0.4, "dead_channels": 0.4},
            suits_activations=_RELU_FAMILY,
            present_when=("init:he", "init:he_uniform", "init:kaiming"),
        ),
        Remedy(
            "batchnorm",
            "Batch normalisation",
            "standardises each layer's pre-activations over the batch (subtract the mean, "
            "divide by the std), so they stay out of the saturated region and at a stable "
            "scale whatever the depth",
            "nn.Sequential(nn.Linear(n, m), nn.BatchNorm1d(m), act)  # BatchNorm2d after a conv",
            treats={
                "vanishing": 0.9,
                "exploding": 0.7,
                "saturation": 0.9,
                "dead_units": 0.5,
                "dead_channels": 0.6,
            },
            # BatchNorm in Transformers trains worse than LayerNorm (batch statistics of
            # padded, variable-length sequences fluctuate: Shen et al. 2020, PowerNorm).
            architectures={"cnn": 0.2, "rnn": None, "transformer": None},
            present_when=(
                "BatchNorm",
                "BatchNorm1d",
                "BatchNorm2d",
                "BatchNorm3d",
                "SyncBatchNorm",
            ),
            risk="depends on the batch: small batches give noisy statistics",
        ),
        Remedy(
            "layernorm",
            "Layer normalisation",
            "standardises each sample's features (not the batch), so it works at any "
            "batch size and inside recurrent and Transformer blocks",
            "nn.Sequential(nn.Linear(n, m), nn.LayerNorm(m), act)",
            treats={"vanishing": 0.7, "exploding": 0.6, "saturation": 0.8},
            architectures={"rnn": 0.3, "transformer": 0.3},
            present_when=("LayerNorm", "RMSNorm"),
        ),
        Remedy(
            "residual",
            "Residual (skip) connections",
            "x + f(x) gives the error signal an identity path around every block, so it "
            "reaches the first layers undiminished (ResNet)",
            "class Block(nn.Module):\n    def forward(self, x):\n        return x + self.fc(self.act(x))",
            treats={"vanishing": 0.85, "exploding": 0.3, "stalled": 0.5},
            architectures={"rnn": None},
            present_when=("residual",),
        ),
        Remedy(
            "lstm_gru",
            "LSTM or GRU in place of a plain RNN",
            "gates let the error flow across many time steps through an additive cell "
            "state, where a plain RNN multiplies it by the same Wᵀ at every step",
            "nn.LSTM(input_size, hidden_size, batch_first=True)  # or nn.GRU",
            treats={"vanishing": 1.0, "exploding": 0.5},
            architectures={"rnn": 1.0, "mlp": None, "cnn": None, "transformer": None},
            present_when=("LSTM", "GRU", "LSTMCell", "GRUCell"),
        ),
        Remedy(
            "grad_clipping",
            "Gradient clipping",
            "caps the gradient norm before the step, so one exploding batch cannot throw "
            "the weights away (standard for RNNs)",
            "loss.backward(); nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0); opt.step()",
            treats={
                "exploding": 1.0,
                "nonfinite": 0.9,
                "unstable_updates": 0.7,
                "skipped_steps": 0.6,
            },
            architectures={"rnn": 1.0},
            present_when=("clipping",),
        ),
        Remedy(
            "lr_schedule",
            "A smaller learning rate, or learning-rate decay",
            "the step is the gradient times the learning rate: a smaller rate, or one "
            "that decays, keeps each update a small fraction of the weights",
            "opt = torch.optim.SGD(model.parameters(), lr=lr / 10); "
            "sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)",
            treats={
                "unstable_updates": 1.0,
                "exploding": 0.6,
                "nonfinite": 0.8,
                "dead_units": 0.5,
                "dead_channels": 0.5,
                "skipped_steps": 0.8,
                "clipped": 1.0,
            },
            # For a Transformer, warmup and a lower peak rate (their own entries) say it better.
            architectures={"transformer": -0.2},
        ),
        Remedy(
            "lr_warmup",
            "Learning-rate warmup",
            "early updates are the largest and least informed (Adam's second-moment "
            "estimate rests on a few gradients, a post-LN Transformer's last layers get "
            "the largest gradients at init): ramping the rate up from near 0 over the "
            "first steps keeps them small until the statistics settle",
            "sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps))"
            "  # sched.step() after each opt.step()",
            treats={
                "exploding": 0.7,
                "unstable_updates": 0.9,
                "nonfinite": 0.6,
                "skipped_steps": 0.5,
                "vanishing": 0.3,
                "attention_logit_growth": 0.5,
                "attention_entropy_collapse": 0.5,
                "output_logit_divergence": 0.4,
            },
            architectures={"transformer": 0.5},
            cite="Vaswani et al. 2017; Goyal et al. 2017; Xiong et al. 2020; Liu et al. 2020 (RAdam); "
            "Wortsman et al. 2023; Zhai et al. 2023",
        ),
        Remedy(
            "lower_peak_lr",
            "A lower peak learning rate",
            "the largest stable step shrinks with depth and width: a Transformer that "
            "spikes or diverges at one peak rate trains at a few times less (Adam's "
            "update is about lr per weight whatever the gradient's scale, so only the "
            "rate bounds it)",
            "opt = torch.optim.AdamW(model.parameters(), lr=peak_lr / 3)  # keep warmup and decay",
            treats={
                "exploding": 0.6,
                "unstable_updates": 0.9,
                "nonfinite": 0.7,
                "skipped_steps": 0.6,
                "clipped": 0.8,
                # Attention and output logits grow faster the larger the rate (Wortsman et
                # al. 2023, Fig. 1): a lower peak rate is the other cure beside the
                # structural ones (QK-layernorm, z-loss), which come first.
                "attention_logit_growth": 0.8,
                "output_logit_divergence": 0.6,
                "attention_entropy_collapse": 0.6,
            },
            architectures={"transformer": 0.4},
            cite="Wortsman et al. 2023 (small-scale proxies for Transformer instabilities)",
        ),
        Remedy(
            "pre_layernorm",
            "Pre-LayerNorm Transformer blocks",
            "x + f(LN(x)) leaves the residual stream un-normalised, so the error reaches "
            "the first blocks through an identity path; post-LN's LN(x + f(x)) divides it "
            "at every block, which makes the lower layers' gradients small, the top "
            "layers' large, and warmup necessary",
            "nn.TransformerEncoderLayer(d, heads, norm_first=True)  # and a final LayerNorm",
            treats={
                "vanishing": 0.8,
                "exploding": 0.7,
                "unstable_updates": 0.6,
                "nonfinite": 0.4,
                # Post-LN rescales the stream at every block, so the residual path cannot
                # keep tokens apart; pre-LN keeps an identity path (Noci et al. 2022).
                "rank_collapse": 0.8,
            },
            architectures={"transformer": 0.5, "mlp": None, "cnn": None, "rnn": None},
            present_when=("pre_ln",),
            cite="Xiong et al. 2020; Nguyen & Salazar 2019; Liu et al. 2020 (Admin); Noci et al. 2022",
        ),
        Remedy(
            "branch_scaling",
            "Scaled residual branches at init (Fixup, SkipInit, zero-init last norm)",
            "each un-normalised residual block adds its branch's variance to the stream, so "
            "the signal and the error grow ×√2 per block with He init; starting each "
            "branch at (or near) zero — the last layer zeroed, or scaled by blocks^(-1/2) — "
            "makes every block the identity at init",
            "nn.init.zeros_(block.conv2.weight)  # Fixup: also scale conv1 by blocks ** -0.5; "
            "with BN: nn.init.zeros_(block.bn2.weight)",
            treats={
                "exploding": 1.0,
                "nonfinite": 0.5,
                "unstable_updates": 0.3,
                # Branches scaled by 1/√depth keep the identity path dominant, so the tokens
                # do not converge to one vector with depth (Noci et al. 2022).
                "rank_collapse": 1.0,
            },
            # In a Transformer the step size and the norms' placement come first.
            architectures={"cnn": 0.3, "mlp": 0.1, "transformer": -0.2, "rnn": None},
            requires=("residual",),
            cite="Zhang et al. 2019 (Fixup); De & Smith 2020 (SkipInit); Goyal et al. 2017; "
            "Radford et al. 2019 (GPT-2's 1/√N); Noci et al. 2022 (rank collapse)",
        ),
        Remedy(
            "forget_bias",
            "LSTM forget-gate bias +1",
            "the cell state carries the error back by the forget gate's value at each "
            "step; a bias of +1 opens it (σ(1) = 0.73) so the error survives many steps, "
            "where a zero or negative bias multiplies it by ≤ 0.5 per step",
            "for n, p in lstm.named_parameters():\n    if n.startswith('bias_ih'):\n"
            "        p.data[hidden:2 * hidden] = 1.0  # gates: input, forget, cell, output",
            treats={"vanishing": 1.0, "stalled": 0.3},
            architectures={"rnn": 0.5, "mlp": None, "cnn": None, "transformer": None},
            requires=("LSTM", "LSTMCell"),
            cite="Gers et al. 2000; Jozefowicz et al. 2015",
        ),
        Remedy(
            "truncated_bptt",
            "Shorter truncated-BPTT windows",
            "the error is multiplied by the recurrent Jacobian once per step it travels "
            "back; cutting the sequence into windows (detaching the carried state) bounds "
            "how many factors can compound",
            "h = tuple(t.detach() for t in h)  # every k steps, before the next window's forward",
            treats={"exploding": 0.5, "nonfinite": 0.4, "unstable_updates": 0.3},
            architectures={"rnn": 0.3, "mlp": None, "cnn": None, "transformer": None},
            risk="dependencies longer than the window are no longer learned",
            cite="Williams & Peng 1990; Sutskever 2013",
        ),
        Remedy(
            "chrono_init",
            "Chrono initialisation of the LSTM gates",
            "the forget gate's bias sets how many steps the cell keeps its state (about "
            "1/(1 − σ(b_f))); drawing b_f = log U(1, T_max − 1), and the input gate's bias "
            "as −b_f, spreads the units' memories over 1 … T_max steps, so the error is "
            "carried back over the longest dependency the task has",
            "T_max = 100  # the longest dependency to learn, in steps\n"
            "b_f = torch.log(torch.empty(hidden).uniform_(1, T_max - 1))\n"
            "for n, p in lstm.named_parameters():\n"
            "    if n.startswith('bias_ih'):\n"
            "        p.data[hidden:2 * hidden] = b_f  # gates: input, forget, cell, output\n"
            "        p.data[:hidden] = -b_f\n"
            "    elif n.startswith('bias_hh'):\n"
            "        p.data[: 2 * hidden] = 0.0",
            treats={"vanishing": 0.9, "stalled": 0.3},
            architectures={"rnn": 0.5, "mlp": None, "cnn": None, "transformer": None},
            requires=("LSTM", "LSTMCell"),
            risk="T_max must be known (or guessed) from the task",
            cite="Tallec & Ollivier 2018 (chrono initialisation); Gers et al. 2000; "
            "Jozefowicz et al. 2015",
        ),
        Remedy(
            "qk_layernorm",
            "QK-layernorm (a LayerNorm on the queries and keys)",
            "an attention logit is q·k/√d, and at a high learning rate the weights behind q "
            "and k grow until the logits reach hundreds and the softmax is one-hot; "
            "normalising each head's q and k before the product bounds every logit by the "
            "norms' learned scales, and the model trains over a wider range of rates",
            "self.q_norm = nn.LayerNorm(head_dim)  # in the attention module's __init__\n"
            "self.k_norm = nn.LayerNorm(head_dim)\n"
            "# in forward, after splitting heads ([batch, heads, time, head_dim]):\n"
            "# q, k = self.q_norm(q), self.k_norm(k)\n"
            "# y = F.scaled_dot_product_attention(q, k, v, is_causal=True)",
            treats={
                "attention_logit_growth": 1.0,
                "attention_entropy_collapse": 0.8,
                "divergence": 0.4,
                "loss_spike": 0.3,
            },
            architectures={"transformer": 0.3, "mlp": None, "cnn": None, "rnn": None},
            present_when=("qk_norm",),
            cite="Dehghani et al. 2023 (ViT-22B); Wortsman et al. 2023; lab `attention`",
        ),
        Remedy(
            "z_loss",
            "z-loss on the output logits",
            "the softmax does not change when every logit moves by the same amount, so "
            "nothing stops the output logits drifting until log Z = logsumexp(logits) is "
            "far from 0 and the logits lose float precision; a small penalty 1e-4·(log Z)² "
            "holds log Z near 0 without changing what the model predicts",
            "logits = model(x)\n"
            "z = torch.logsumexp(logits, dim=-1)\n"
            "loss = F.cross_entropy(logits.flatten(0, -2), y.flatten()) + 1e-4 * (z**2).mean()",
            treats={"output_logit_divergence": 1.0, "divergence": 0.3, "nonfinite": 0.3},
            architectures={"transformer": 0.3},
            cite="Chowdhery et al. 2022 (PaLM); Wortsman et al. 2023",
        ),
        Remedy(
            "sigma_reparam",
            "σReparam (spectrally reparametrised attention weights)",
            "attention entropy collapses when the spectral norm of the query/key weights "
            "grows (the logits' spread is bounded by it); Ŵ = γ/σ(W)·W with σ(W) the "
            "largest singular value (power iteration) and γ a learned scalar keeps that "
            "norm where γ puts it, so no head is pushed to one-hot",
            "qkv = nn.utils.parametrizations.spectral_norm(attn.qkv)  # W / σ(W)\n"
            "gamma = nn.Parameter(torch.ones(()))  # learned: Ŵ = γ/σ(W)·W\n"
            "# in forward: y = gamma * F.linear(x, qkv.weight) + qkv.bias",
            treats={"attention_entropy_collapse": 1.0, "attention_logit_growth": 0.7},
            architectures={"transformer": 0.3, "mlp": None, "cnn": None, "rnn": None},
            cite="Zhai et al. 2023 (σReparam, attention entropy collapse)",
        ),
        Remedy(
            "adam_beta2_eps",
            "Adam's β₂ lower (0.95) and ε set for the gradient's scale",
            "with β₂ = 0.999 the second moment remembers ~1000 steps, so after a quiet "
            "stretch a sudden large gradient is divided by a stale, small √v and the "
            "update spikes; β₂ = 0.95 follows the gradient's scale faster, and an ε too "
            "small for tiny gradients lets rare ones make full-size steps",
            "opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8)",
            treats={"exploding": 0.4, "unstable_updates": 0.5, "nonfinite": 0.4},
            architectures={"transformer": 0.3, "rnn": 0.1},
            requires=("optimizer:adam", "optimizer:adamw", "optimizer:unknown"),
            cite="Brown et al. 2020 (GPT-3, β₂ = 0.95); Molybog et al. 2023; Wortsman et al. 2023",
        ),
        Remedy(
            "adam",
            "An adaptive optimiser (Adam)",
            "rescales each parameter's step by running moments of its gradient, so layers "
            "with small gradients still move",
            "opt = torch.optim.Adam(model.parameters(), lr=1e-3)",
            treats={"stalled": 0.8, "vanishing": 0.3, "unstable_updates": 0.3},
            present_when=("optimizer:adam", "optimizer:adamw"),
        ),
        Remedy(
            "pretraining",
            "Unsupervised pre-training, then fine-tuning",
            "greedy layer-wise pre-training (e.g. autoencoders) gives a deep network a "
            "starting point where early layers already carry useful features",
            "# train each layer as an autoencoder on the previous layer's outputs, then fine-tune all",
            treats={"vanishing": 0.3, "stalled": 0.3},
            # A 2006 remedy for deep sigmoid MLPs; convolutional and attention models of
            # today are not pre-trained layer-wise.
            architectures={"rnn": None, "transformer": None, "cnn": None},
        ),
        Remedy(
            "raise_lr",
            "A larger learning rate (after checking the loss and the labels)",
            "a loss that stays where it started while the gradients are healthy moves too "
            "slowly: the step is too small for the loss surface; but first check that the "
            "loss can fall at all (labels shuffled or misaligned, a target that does not "
            "depend on the input, a loss on the wrong outputs)",
            "opt = torch.optim.SGD(model.parameters(), lr=lr * 3)  # or a range test: lr × 10^k",
            treats={"plateau": 0.8},
            risk="too large a rate diverges: raise it step by step",
        ),
    ]
}

# What the remedies above do for unstable training (issue 14 §2: diagnose's divergence,
# grad_norm_spike, loss_spike, oscillation and plateau), kept as one table and merged into
# their ``treats``: the step size is the first cause of each, clipping bounds the spikes,
# warmup and Adam's β₂ the early and the stale-moment ones.
_INSTABILITY_TREATS: dict[str, dict[str, float]] = {
    "lr_schedule": {
        "loss_instability": 1.0,
        "divergence": 1.0,
        "grad_norm_spike": 0.8,
        "loss_spike": 0.8,
        "oscillation": 1.0,
    },
    "lower_peak_lr": {
        "loss_instability": 0.9,
        "divergence": 0.9,
        "grad_norm_spike": 0.8,
        "loss_spike": 0.7,
        "oscillation": 0.8,
    },
    "grad_clipping": {
        "loss_instability": 0.6,
        "divergence": 0.7,
        "grad_norm_spike": 1.0,
        "loss_spike": 0.8,
    },
    "lr_warmup": {
        "loss_instability": 0.5,
        "divergence": 0.7,
        "grad_norm_spike": 0.7,
        "loss_spike": 0.6,
    },
    "adam_beta2_eps": {
        "loss_instability": 0.5,
        "grad_norm_spike": 0.6,
        "loss_spike": 0.6,
        "divergence": 0.4,
    },
    "batchnorm": {"plateau": 0.4, "grad_norm_spike": 0.3},
    "residual": {"plateau": 0.4},
    "he_init": {"plateau": 0.4},
    "adam": {"plateau": 0.6, "oscillation": 0.3},
}
for _key, _treats in _INSTABILITY_TREATS.items():
    REMEDIES[_key] = dataclasses.replace(
        REMEDIES[_key], treats={**REMEDIES[_key].treats, **_treats}
    )
