"""Gymnasium environments of tw-rl."""
