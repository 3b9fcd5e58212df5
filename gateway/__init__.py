"""The gRPC gateway: validation, auth, deadlines, streaming, health, reflection, metrics."""
