"""The inference log and user feedback: a durable store that monitoring and curation read."""
