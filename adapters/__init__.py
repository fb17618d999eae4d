"""Adapters: the drafter types, one module each (TokenAdapter, EAGLE-3 feature fusion), their shared
interface and registry (adapters/registry.py) and the export format."""
