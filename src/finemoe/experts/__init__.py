"""Expert store (host), device slot pools and transports, the expert cache, and the transformers hook."""
