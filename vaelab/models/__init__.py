"""Architectures (see vaelab.registry) and the VAE that joins them."""

from vaelab.models.conv import ConfigError
from vaelab.models.vae import VAE, VAEOutput

__all__ = ["VAE", "VAEOutput", "ConfigError"]
