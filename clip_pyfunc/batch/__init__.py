"""Table-scale jobs: embed tables on Spark (spark/) and compare checkpoints on your data
(evaluate/).
"""
