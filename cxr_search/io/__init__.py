"""Files and folders: the storage layer (local paths and object stores), the Optuna journal, where things live
(cache and experiment roots), and the names of every file an experiment or a model folder holds. No Ray, no torch."""
