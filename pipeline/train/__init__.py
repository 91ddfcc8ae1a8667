"""Pre-training: data sampling (cubes, chip folders), the Ray Train loop, training checkpoints, monitoring.

Entry points: :func:`pipeline.train.loop.run_pretrain` (driver) and ``skypipe pretrain JOB.yaml``.
"""
