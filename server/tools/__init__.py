"""What runs the model in process: kernel conformance, the race workload (and later exploration)."""
