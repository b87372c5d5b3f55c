"""The benchmark scripts of experiments/ run, shrunk to seconds, and the two ways each
compares compute the same numbers (a benchmark whose baseline computes something else
times nothing); the speed figures themselves are never asserted."""

import numpy as np

from experiments import bench_similarity, bench_stitching


def test_stitching_benchmark_sweep_equals_its_one_pair_at_a_time_loop():
  report = bench_stitching.main(["--preset=mlp", "--objectives=tlm", "--steps=3",
                                 "--batch_size=64", "--loops=jax", "--matmul_n=64",
                                 "--max_points=3"])
  entry = report["objectives"]["tlm"]
  assert entry["max_abs_diff"] < 1e-4
  assert entry["sweep"]["stitches"] == entry["loop"]["stitches"] > 0
  assert entry["sweep"]["compile_s"] <= entry["sweep"]["wall_s"]
  assert entry["ratio_wall"] > 0


def test_similarity_benchmark_engine_equals_its_per_pair_loop():
  out = bench_similarity.main(["--model=cnn", "--width_multiplier=1", "--num_examples=96",
                               "--batch_size=32", "--image_size=8", "--channels=1"])
  assert out["max_abs_diff"] < 1e-4
  assert np.isfinite(out["ratio"]) and out["ratio"] > 0
