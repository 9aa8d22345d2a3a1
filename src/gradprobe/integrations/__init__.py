"""Integrations with the tools people train in and look at: Lightning, Hugging Face,
TensorBoard, Weights & Biases and MLflow.

Each lives in its own module and imports its tool only there, so ``import gradprobe``
never needs them; install the matching extra (``gradprobe[lightning]``,
``gradprobe[hf]``, ``gradprobe[tensorboard]``, ``gradprobe[wandb]``,
``gradprobe[mlflow]``). See ``docs/integrations.md``.
"""
