"""The Envoy edge: bootstrap generation, descriptor-set build and run helper."""
