"""Tests of `faces`."""
