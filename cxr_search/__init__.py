"""cxr-search: distributed hyperparameter search for chest X-ray classification."""

__version__ = "0.1.0"

# Class order used everywhere: label index i means CLASSES[i] (folders, metrics, probabilities, ensembles).
CLASSES: tuple[str, ...] = ("COVID19", "PNEUMONIA", "NORMAL")
