"""The XLA CPU setting every command-line job starts with, and why.

No library call changes a process-wide setting (JAX's configuration, the environment);
the jobs set this one before JAX compiles anything, and a script or a Colab sets it the
same way, first thing::

  import os
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_cpu_experimental_ynn_fusion_type=-individual_convolution")

Why: jaxlib 0.10's CPU backend hands convolutions and matrix products to YNNPACK by
default. Its convolutions are slower than XLA's own here, its matrix products faster, so
the setting takes the convolutions (only) back. On a 2-core x86 CPU:

* the forward pass of a width-64 CIFAR ResNet-18 on 256 images took 1.60 s against
  2.49 s (every point's activations equal to 1e-6); one batch of the minibatch-CKA update
  (the Grams of 2 x 9 layers) 0.61 s, against 0.80 s with YNNPACK off altogether;
* the stitching benchmark's ResNet-18 TLM sweep took 121 s against 175 s;
* the quickstart job took 280 s against 311 s (its stitch sweep 224 s against 252 s);
* a training step of small models (CNN, ResNet-20, ResNet-18 at width 16) moved by -13%
  to +3%, within this machine's run-to-run spread.

The numbers it changes are float rounding: a trained model's weights differ in their last
bits, and so, through training, its accuracy by a test example or two. Accelerators
ignore it.
"""

from __future__ import annotations

import os
from typing import MutableMapping

OPTION = "xla_cpu_experimental_ynn_fusion_type"
YNN_CONVOLUTIONS_OFF = f"--{OPTION}=-individual_convolution"


def with_ynn_convolutions_off(xla_flags: str) -> str:
  """`xla_flags` with YNNPACK's convolutions off, unless it sets that option already."""
  if OPTION in xla_flags:
    return xla_flags
  return f"{xla_flags} {YNN_CONVOLUTIONS_OFF}".strip()


def set_for_jobs(environ: MutableMapping[str, str] | None = None) -> None:
  """Set the jobs' CPU flags in `environ` (default: this process's environment), before
  JAX compiles anything; XLA_FLAGS that name the option already are left as they are."""
  environ = os.environ if environ is None else environ
  environ["XLA_FLAGS"] = with_ynn_convolutions_off(environ.get("XLA_FLAGS", ""))
