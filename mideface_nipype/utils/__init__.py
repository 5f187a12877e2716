"""Shared utilities: reading, validating and safely publishing volumes; thread limits; BIDS
discovery and naming.
"""
