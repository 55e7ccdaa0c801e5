"""The inference service: model registry, engines and the InferenceService servicer."""
