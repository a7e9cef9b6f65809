"""Planning: the placement-partitioning problem, its objectives and solvers, the live
problem built from a capacity profile, the privacy policy and the route of a plan.

Pure code over typed values (no I/O, no torch): the split reviser, the orchestrator,
the broadcaster, the workers and the CLI all plan with it.
"""
