"""Models-from-code entry files: MLflow executes one of these to build the pyfunc model."""
