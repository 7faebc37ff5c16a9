"""What serves the DPA pipeline but is not a stage: ArmoRM probe and gate, data converters, the demo judge, demo data, the embedded model."""
