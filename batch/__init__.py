"""Batch layer: play counts, implicit ALS, fold-in, evaluation and the model store."""
