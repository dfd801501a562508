"""playrec application layer: the command line and the development Kafka broker."""

__version__ = "0.1.0"
