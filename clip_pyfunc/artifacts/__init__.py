"""Artifacts: checkpoint resolution and the hub (checkpoint), tower artifacts (towers), label files
(labels): the only code that knows file names.
"""
