"""Adapters: the drafters (TokenAdapter, EAGLE-3 feature fusion) as plain torch modules."""
