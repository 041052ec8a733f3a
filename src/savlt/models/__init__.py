"""Backbone, adapters, structure prior, ROI pooling and the SAVLT classifier."""
