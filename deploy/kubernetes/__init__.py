"""Kubernetes manifests (kustomize) and the renderer of their generated files (`render`)."""
