"""Data layer: datasets on disk, events, video, the synthetic world and the feature store."""
