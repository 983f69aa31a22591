"""Train one model on prepared arrays, plain PyTorch, no Ray.

- `loop`: `fit`, the training loop (visible top to bottom) and early stopping;
- `runtime`: device, precision, the resident data path and the model input;
- `evaluation`: `evaluate` and `predict_proba`;
- `optim`: optimizers and schedules, described as data;
- `model_folder`: the model-folder format (checkpoints, history, best weights) and `load_best_model`;
- `compiling`: when a run trains under `torch.compile`;
- `faults`: test-only fault injection."""
