"""mideface-nipype: minimally invasive defacing of head MRI (MiDeFace) as Nipype workflows."""

__version__ = "0.1.0"
__all__ = ["DefaceResult", "__version__", "deface"]


def __getattr__(name: str):
    """``deface`` and ``DefaceResult`` load on first use: the command line starts without them."""
    if name in ("deface", "DefaceResult"):
        from mideface_nipype import api

        return getattr(api, name)
    raise AttributeError(f"module 'mideface_nipype' has no attribute {name!r}")
