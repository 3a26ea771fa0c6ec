"""Datasets (synthetic squares, video and image folders, caches), all yielding one typed sample."""
