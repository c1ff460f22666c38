"""vaelab: tracked variational autoencoder experiments from YAML specs."""

__version__ = "0.1.0"
