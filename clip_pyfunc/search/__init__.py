"""Search: Qdrant collections that record their embedding space (index), and queries over them
(query).
"""
