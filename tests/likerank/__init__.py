"""Tests of `likerank`."""
