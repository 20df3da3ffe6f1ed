"""One module per pipeline stage; each holds one readable recipe from inputs to outputs."""
