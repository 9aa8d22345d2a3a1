"""gradprobe: see, measure and fix vanishing and exploding gradients in PyTorch."""

from .activations import ACTIVATIONS, Activation, activation_of
from .errors import GradprobeError

__version__ = "0.1.0"

__all__ = ["ACTIVATIONS", "Activation", "GradprobeError", "__version__", "activation_of"]
