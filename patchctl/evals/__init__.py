"""Evaluating a composed model on a suite: one function per task type.

``evaluators`` holds the task types (classification, lm-loss, multiple-choice,
exact-match, custom ``python:module:function``) and :func:`evaluate`; ``runtime``
picks the device, loads the model and sets torch's threads.
"""

from patchctl.evals.evaluators import EVALUATORS, evaluate
from patchctl.evals.runtime import device_name, load_model, pick_device

__all__ = ["EVALUATORS", "device_name", "evaluate", "load_model", "pick_device"]
