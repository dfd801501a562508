"""Approximate nearest-neighbour index: the hyperplane forest."""
