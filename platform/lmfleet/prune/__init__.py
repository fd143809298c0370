"""The `prune` stage: magnitude (unstructured) or structured pruning of a trained model, optional recovery
fine-tuning in the pretraining loop, and the export."""
