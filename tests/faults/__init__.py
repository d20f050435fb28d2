"""The fault suite: processes and the broker failing for real (`make test-faults`)."""
