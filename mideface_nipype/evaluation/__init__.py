"""How defacing is judged: privacy attacks, brain preservation and cost, the peer defacers and the
dataset audit.
"""
