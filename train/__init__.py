"""Training: Lightning modules, data modules and the stage entry points (extract, train, export, pipeline)."""
