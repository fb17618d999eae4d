"""The two frozen VLMs: Video-LLaVA (target) and EventGPT (draft)."""
