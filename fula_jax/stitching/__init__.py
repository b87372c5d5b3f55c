"""Model stitching: maps, the four objectives (TLM, SLM, DM, FuLA), least squares and
the sweep engine that computes whole L_A x L_B matrices.

Colab use, with models and splits in memory::

  from fula_jax import stitching
  mats = stitching.sweep(model_a, vars_a, model_b, vars_b, train, test,
                         {"objectives": ["fula", "dm"], "epochs": 1})
  mats["stitch_fula/accuracy"].plot()
"""

from fula_jax.stitching.lstsq import fit as lstsq_fit
from fula_jax.stitching.maps import MapSpec, UnstitchableError, plan
from fula_jax.stitching.objectives import OBJECTIVES, fula_loss
from fula_jax.stitching.objectives import get as get_objective
from fula_jax.stitching.sweeper import (MEASURES, SweepResult, default_config, run_sweep,
                                      sweep)

__all__ = ["MEASURES", "MapSpec", "OBJECTIVES", "SweepResult", "UnstitchableError",
           "default_config", "fula_loss", "get_objective", "lstsq_fit", "plan",
           "run_sweep", "sweep"]
