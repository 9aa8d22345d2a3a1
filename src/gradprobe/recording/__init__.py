"""The recording engine: the components the :class:`~gradprobe.Probe` facade is made of.

Each owns its state; they share one :class:`~gradprobe.recording.context.Context` and
tell each other a few events (:data:`~gradprobe.recording.context.EVENTS`)::

    engine     Engine: the components of one Probe, made and wired in one place
    context    Context: configuration, bindings, buffer, the step's state; events; the guard
    hookup     Hookup: every hook registered, every entry point routed, a failure's gap
    passes     Passes: which forward passes are trained, what a module hook does with a call
    forward    ForwardCapture: gates, output statistics, held outputs reduced in batches
    units      Units: which dimension holds a module's units, learned in call order
    errors     ErrorCapture: dL/d(output) and the module's share of dL/d(input); Deferred
    sequences  SequenceCapture: token_cosine (blocks), logit stats (the final projection);
               the sites (sequence-only slots); TimeErrors: error through time (for errors)
    kept       Kept: device tensors kept from step to step (constants, indices, staging)
    tensors    the first floating-point tensor of a call's output or input
    follow     Follow: discarded gradients, frozen modules, a model that changes
    params     ParamStats: gradient and parameter norms, pre-clip norms, the "auto" sentinel
    sentinel   SentinelRoute: a sentinel step on one short path (ParamStats where it cannot)
    updates    UpdateSnapshot: the parameters' copies and the update ratio
    clock      StepClock: the cadence, the spike burst, a step's close
    scaler     ScalerWatch: a step the GradScaler skipped
    optstep    OptimizerStep: the optimizer's step hooks, its closure, probe.step()
    attn       AttentionCapture: the attention watch around a recorded pass, the stack of
               probed modules running, the step's attention calls (gradprobe.attention)
    rows       Rows: flushes into long-form rows, the store, listeners
    meta       describe (the meta), Progress (what is learned while training)
    bindings   the probed modules' slots and the parameters, chosen from the model

Events (who emits → who handles): forward_ended (passes, errors, follow → forward),
backward_ended (params' queued callback → params, follow), backward_accumulating (errors
→ follow), gradients_marked / gradients_discarded (follow → units), step_closing (clock →
forward, which settles units; attn, which summarises the step's attention calls), step_discarded (clock, scaler → forward, units, params,
updates, attn), step_closed (clock → params, sentinel, follow, errors, optstep, hookup), model_changing
(follow → rows), sequence_sites (follow → sequences, errors: the sites of a changed model),
model_rebound (follow → params, sentinel, updates, hookup). At a step the sentinel's
short route is armed for, the end of backward is its own queued callback (sentinel), which
emits backward_ended only where it hands the step to the general path.
"""
