"""Frozen-feature evaluation: kNN, linear probes, BigEarthNet multi-label mAP (``skypipe eval ...``)."""
