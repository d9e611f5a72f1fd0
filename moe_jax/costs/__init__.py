"""What a compiled program costs: compile for a backend, parse the HLO, walk it op by op; the
analytic estimate beside it.
"""
