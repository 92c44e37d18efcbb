"""Tests of `scoring`."""
