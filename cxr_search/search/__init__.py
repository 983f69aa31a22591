"""Ray Tune layer: the only package (with cli.py) that imports Ray."""
