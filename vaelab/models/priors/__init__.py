"""Priors p(z) a model may use (`model.prior`), one module and record each; vaelab.registry.PRIORS
names them. Each builds a module with `log_prob(z, model)`, `sample(n, generator, model, device)`
and `kl_dims(mu, logvar)` (the per-dimension KL in closed form, or None where it has none: the
VAE then estimates the KL by Monte Carlo, log q(z|x) - log p(z) at its sampled z)."""
