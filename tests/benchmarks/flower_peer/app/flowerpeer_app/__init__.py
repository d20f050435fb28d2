"""The deployment arm's ServerApp and ClientApp (see flower_peer/README.md)."""
