"""The strategy search: enumerate, estimate, compile the shortlist, rank by objective and SLOs,
with a checksummed cache.

search     enumerate_strategies, estimate, rank_estimates, fewest_devices, plan (the search itself)
spec       SearchSpec: what one search is asked
candidate  Candidate (one strategy's estimated and compiled figures), Figures, rank_key
result     PlanResult: what the search found, and the plan JSON
workers    compile_all: the shortlist compiled through the cache, in worker processes
cache      the compile cache: keys, load, store
dispatch   compare_dispatch: the best strategy with each expert dispatch method
charts     pareto_plot
"""
