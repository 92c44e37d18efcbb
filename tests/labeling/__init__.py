"""Tests of `labeling`."""
