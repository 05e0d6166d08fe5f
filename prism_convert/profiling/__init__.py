"""Stage 1, `prism profile`: run calibration tokens through the model layer by layer and record routing."""
