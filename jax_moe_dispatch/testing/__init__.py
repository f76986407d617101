"""Checking aids: the independent NumPy oracle (:mod:`.oracle`) that tests and the benchmark use."""
