"""The strategy search: enumerate, estimate, compile the shortlist, rank by objective and SLOs,
with a checksummed cache.
"""
