"""Tests of `scrape`."""
