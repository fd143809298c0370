"""The pretraining stage: Ray Train TorchTrainer over packed shards, every parallel strategy in one loop."""
