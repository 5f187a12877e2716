"""Nipype graphs: one head (``base``) and a BIDS dataset (``bids``)."""
