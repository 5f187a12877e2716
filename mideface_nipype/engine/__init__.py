"""The science of each MiDeFace step, one module per step: plain functions on arrays and nibabel
images, free of Nipype.
"""
