"""Developer tools: random and toy checkpoints and sample images, for tests, the demo and
benchmarks. No model imports them.
"""
