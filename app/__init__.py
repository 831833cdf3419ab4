"""The channels gateway: a FastAPI service over the `layers` library."""
