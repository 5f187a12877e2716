"""mideface-nipype: minimally invasive defacing of head MRI (MiDeFace) as Nipype workflows."""

__version__ = "0.1.0"
