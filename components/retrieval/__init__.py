"""Grounded answers: passages of a documentation corpus retrieved for a question."""
