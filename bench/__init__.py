"""bench: an experiment-tracked benchmarking harness for small CNNs on CIFAR-10."""
__version__ = "0.1.0"
