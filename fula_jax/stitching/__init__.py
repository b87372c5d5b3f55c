"""Model stitching: maps and their capacity ladder, the objectives (TLM, SLM, DM, FuLA,
FFM) as values, least squares, and the sweep engine that computes whole L_A x L_B
matrices: plan (pure) -> store (resume) -> stacks, programs -> measures (one protocol)
-> api.

Colab use, with any two models that follow the model protocol and data in memory::

  from fula_jax import stitching
  mats = stitching.sweep(model_a, vars_a, model_b, vars_b, train, test,
                         {"objectives": [stitching.FuLA(k="block3.1"), "dm"],
                          "epochs": 1})
  mats["stitch_fula/accuracy"].plot()
"""

from fula_jax.stitching.api import (ConvergenceWarning, SweepResult, program_flops,
                                   run_sweep, sweep)
from fula_jax.stitching.lstsq import fit as lstsq_fit
from fula_jax.stitching.maps import MapSpec, UnstitchableError
from fula_jax.stitching.measures import NAMES as MEASURES
from fula_jax.stitching.objectives import DM, OBJECTIVES, SLM, TLM, FuLA, fula_loss
from fula_jax.stitching.objectives import get as get_objective
from fula_jax.stitching.settings import default_config

__all__ = ["ConvergenceWarning", "DM", "FuLA", "MEASURES", "MapSpec", "OBJECTIVES", "SLM", "SweepResult", "TLM",
           "UnstitchableError", "default_config", "fula_loss", "get_objective",
           "lstsq_fit", "program_flops", "run_sweep", "sweep"]
