"""The lab: every remedy demonstrated and measured on small real data, reproducibly.

Shared builders: :mod:`.data` (digits, the adding problem), :mod:`.models` (MLPs, residual
MLPs, CNNs, recurrent nets with named inits) and :mod:`.training` (``fit``: one training
run under a Probe).
"""
