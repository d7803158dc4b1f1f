"""The pyfunc models: request (what predict accepts, the 400 edge), base, text, image, classifier,
combined; entry/ holds the models-from-code files.
"""
