"""The XLA CPU setting the similarity jobs start with, and why.

No library call changes a process-wide setting (JAX's configuration, the environment);
the command-line jobs whose time goes to convolution forward passes set this one before
JAX compiles anything, and a script or a Colab sets it the same way, first thing::

  import os
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_experimental_ynn_fusion_type=")

Why: jaxlib 0.10's CPU backend hands work to YNNPACK by default. With that turned off,
the forward pass of a width-64 CIFAR ResNet-18 on 256 images took 1.65 s against 2.49 s
(every point's activations equal to 1e-6) on a 2-core x86 CPU, and the similarity
benchmark's forwards over 4,096 images took 52.5 s, where PyTorch's took 66.7 s. A
training step of small models changed by -15% to +7% (CNN, ResNet-20, ResNet-18 at
width 16), so the training and stitching jobs leave it alone. Accelerators ignore it.
"""

from __future__ import annotations

import os
from typing import MutableMapping

OPTION = "xla_cpu_experimental_ynn_fusion_type"
YNN_OFF = f"--{OPTION}="
JOBS = ("similarity", "model_matrix")  # jobs whose time is forward passes


def with_ynn_off(xla_flags: str) -> str:
  """`xla_flags` with YNNPACK's fusions off, unless it sets that option already."""
  if OPTION in xla_flags:
    return xla_flags
  return f"{xla_flags} {YNN_OFF}".strip()


def for_job(job: str, environ: MutableMapping[str, str] | None = None) -> None:
  """Set job `job`'s CPU flags in `environ` (default: this process's environment),
  before JAX compiles anything."""
  environ = os.environ if environ is None else environ
  if job in JOBS:
    environ["XLA_FLAGS"] = with_ynn_off(environ.get("XLA_FLAGS", ""))
