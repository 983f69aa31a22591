"""The nine backbones (`registry.create_model`), their ImageNet weights (`weights`: sources, the staged layout) and
the one code that downloads them (`fetch`)."""
