"""Representational similarity: the CKA family, Procrustes, the CCA family, shape
metrics, local-neighbourhood measures (kNN family), RSA, linear predictivity, output
measures, streaming minibatch/exact CKA over whole layer matrices, permutation nulls,
calibrated scores, bootstrap intervals, model x model matrices, and the jobs.

  from fula_jax import similarity
  similarity.get("cka_linear_debiased")(x, y)           # one pair, jittable
  similarity.compute("procrustes", x, y)                  # one pair, checked
  mat, info = similarity.matrix("svcca", acts_a, acts_b)  # all pairs, in memory
  mats = similarity.matrices(model_a, va, model_b, vb, images)   # two models
  mats = similarity.matrices(model_a, va, model_b, vb, images,     # options, typed
                             estimator=similarity.Estimator(linear_cka="exact"),
                             uncertainty=similarity.Uncertainty(permutations=200))
  acc = similarity.minibatch.init(len(a_layers), len(b_layers))   # streaming
  similarity.calibrate("mutual_knn", x, y, 200, key=0)    # value against its null
  similarity.bootstrap("cka_linear_debiased", x, y, 1000)  # percentile interval
  similarity.outputs.compute("error_consistency", logits_a, logits_b, labels)
  similarity.model_matrix({"a": (m_a, v_a), "b": (m_b, v_b)}, images)  # model x model

Inverted-image CKA (Jones et al. 2022) lives in :mod:`fula_jax.similarity.inversion`.
The engine behind `matrices` is :mod:`fula_jax.similarity.layers`; the command-line
jobs (``similarity.job``, ``similarity.model_matrix_job``) are imported lazily.
"""

from fula_jax.similarity import intervals
from fula_jax.similarity import across_models
from fula_jax.similarity import calibration
from fula_jax.similarity import cca
from fula_jax.similarity.across_models import model_matrix
from fula_jax.similarity.api import matrices
from fula_jax.similarity import checks
from fula_jax.similarity import layers
from fula_jax.similarity.layers import Estimator
from fula_jax.similarity.layers import Points
from fula_jax.similarity.layers import Uncertainty
from fula_jax.similarity import cka
from fula_jax.similarity import measures
from fula_jax.similarity import minibatch
from fula_jax.similarity import neighbours
from fula_jax.similarity import null
from fula_jax.similarity import outputs
from fula_jax.similarity import predictivity
from fula_jax.similarity import procrustes
from fula_jax.similarity import rsa
from fula_jax.similarity import shape
from fula_jax.similarity.intervals import Interval
from fula_jax.similarity.intervals import bootstrap
from fula_jax.similarity.calibration import Calibrated
from fula_jax.similarity.calibration import calibrate
from fula_jax.similarity.checks import SimilarityWarning
from fula_jax.similarity.measures import INVARIANCES
from fula_jax.similarity.measures import MEASURES
from fula_jax.similarity.measures import Measure
from fula_jax.similarity.measures import compute
from fula_jax.similarity.measures import get
from fula_jax.similarity.measures import matrix
from fula_jax.similarity.measures import names
from fula_jax.similarity.null import NullResult
from fula_jax.similarity.null import permutation_test

__all__ = ["INVARIANCES", "MEASURES", "Calibrated", "Estimator", "Interval", "Measure",
           "NullResult", "Points", "SimilarityWarning", "Uncertainty", "across_models",
           "bootstrap", "calibrate", "calibration", "cca", "checks", "cka", "compute",
           "get", "intervals", "layers", "matrices", "matrix", "measures", "minibatch",
           "model_matrix", "names", "neighbours", "null", "outputs", "permutation_test",
           "predictivity", "procrustes", "rsa", "shape"]
