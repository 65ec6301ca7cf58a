"""What every stage shares: storage, the run's paths, the feature-store reader, models, the SAE, the
encoder and the Ray adapter."""
