"""Speculative decoding: the acceptance metrics, offline simulation and online decoding."""
