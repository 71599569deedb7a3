"""Flywheel components: plain, typed Python, one module per pipeline stage."""
