"""Ray Tune wiring, the only package (with `pipeline` and the CLI) that imports Ray: trial resources, the trainable,
the Optuna searcher, callbacks and the console, the stage runner, and Ray start-up."""
