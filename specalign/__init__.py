"""specalign: alignment drafters for cross-modal speculative decoding."""

__version__ = "0.1.0"
