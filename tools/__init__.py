"""What serves the DPA pipeline but is not a stage: ArmoRM probe and gate, rating and preference converters,
the demo judge, the demo data and the embedded model."""
