"""Integrations with the tools people train in: Lightning, Hugging Face, TensorBoard.

Each lives in its own module and imports its tool only there, so ``import gradprobe``
never needs them; install the matching extra (``gradprobe[lightning]``,
``gradprobe[hf]``, ``gradprobe[tensorboard]``). See ``docs/integrations.md``.
"""
