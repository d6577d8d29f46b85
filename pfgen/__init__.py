"""pfgen: long video generation with autoregressive video diffusion and a head-aware KV cache.

Heavy imports (torch, diffusers) happen lazily so that `pfgen --help` stays instant.
"""

__version__ = "0.1.0"


def load_pipeline(*args, **kwargs):
    """Build a `pfgen.pipeline.Pipeline` (no arguments: the embedded world model)."""
    from pfgen.pipeline import load_pipeline as _load

    return _load(*args, **kwargs)


__all__ = ["load_pipeline", "__version__"]
