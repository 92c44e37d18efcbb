"""Tests of `dags`."""
