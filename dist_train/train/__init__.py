"""The training loop and what it owns: the step, gradient averaging, the clock, checkpoint
state and resume checks, the start agreement, evaluation, the summary and the outputs."""

from .loop import Result, fit

__all__ = ["Result", "fit"]
